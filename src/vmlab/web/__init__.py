"""The live dashboard: EventBus, node status, console and screen feeds, and the web server.

    eventbus.py   events, replay history, non-blocking fan-out
    status.py     NodeStatus and the StatusBoard (state derived from events)
    feeds.py      console.log tail and screendump thumbnails per node
    server.py     aiohttp: the page, /ws, /screenshot/{node}, local assets
    dashboard.py  the facade the Env calls
    assets/       index.html, app.js, style.css (no CDN)
"""
from .dashboard import Dashboard
from .eventbus import Event, EventBus, EventKind, Subscription
from .status import NodeStatus, StatusBoard

__all__ = ["Dashboard", "EventBus", "Event", "EventKind", "Subscription", "NodeStatus",
           "StatusBoard"]
