"""The vmlab guest agent (agent.py), the appliance /init (init.sh) and its udhcpc hook (udhcpc.sh).

agent.py is shipped into guests as a standalone script: stdlib only, no imports from vmlab.
"""
