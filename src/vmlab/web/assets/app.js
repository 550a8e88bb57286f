// vmlab dashboard client: applies the server's JSON messages to the DOM.
// Protocol (see web/server.py): a "state" message (a full snapshot, including `seq`, the last
// event it reflects), then "event" messages: the history (seq <= state.seq: only logged, their
// effect is already in the snapshot), then live ones (applied and logged).
"use strict";

const ICONS = { pending: "○", running: "◉", done: "✓", failed: "✗" };
const MAX_CONSOLE_LINES = 200;   // as NodeStatus keeps
const MAX_EVENTS = 500;          // as the EventBus history keeps
const $ = (id) => document.getElementById(id);

let stateSeq = 0;
let test = { state: "running", started_at: Date.now() / 1000, ended_at: null };
const steps = new Map();   // key -> step record

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// Keep a scrolling box pinned to its bottom unless the user scrolled up.
function appendPinned(box, node, max) {
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 12;
  box.appendChild(node);
  while (box.childElementCount > max) box.firstElementChild.remove();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function fmtTime(t) {
  const d = new Date(t * 1000);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function fmtSecs(s) {
  if (s === null || s === undefined) return "";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
}

// ------------------------------------------------------------------ test status

function renderTest() {
  const badge = $("test-status");
  badge.className = `badge badge-${test.state}`;
  const end = test.ended_at || Date.now() / 1000;
  const label = test.state.charAt(0).toUpperCase() + test.state.slice(1);
  badge.textContent = `${label} · ${fmtSecs(Math.max(0, end - test.started_at))}`;
  document.title = `${test.state === "running" ? "◉" : test.state === "passed" ? "✓" :
                     test.state === "failed" ? "✗" : "■"} vmlab: ${$("title").textContent}`;
}

// ------------------------------------------------------------------ steps

function renderSteps() {
  const list = $("steps");
  const ordered = [...steps.values()].sort(
    (a, b) => (a.framework === b.framework ? a.key - b.key : a.framework ? -1 : 1));
  list.replaceChildren(...ordered.map((s) => {
    const li = el("li", `step step-${s.status}`);
    li.id = `step-${s.key}`;
    li.title = s.error || s.name;
    li.append(el("span", "step-icon", ICONS[s.status] || "?"), el("span", "step-name", s.name),
              el("span", "step-time", stepElapsed(s)));
    if (s.error) li.append(el("div", "step-error", s.error));
    return li;
  }));
  const done = ordered.filter((s) => s.status === "done").length;
  $("step-count").textContent = `${done}/${ordered.length}`;
}

function stepElapsed(s) {
  if (s.status === "running" && s.started_at) return fmtSecs(Date.now() / 1000 - s.started_at);
  return fmtSecs(s.elapsed_s);
}

function tick() {
  if (test.state === "running") renderTest();
  for (const s of steps.values()) {
    if (s.status !== "running") continue;
    const li = $(`step-${s.key}`);
    if (li) li.querySelector(".step-time").textContent = stepElapsed(s);
  }
}

// ------------------------------------------------------------------ nodes

function nodeCard(n) {
  const card = el("article", "card");
  card.id = `node-${n.name}`;
  const head = el("header", "card-head");
  const state = el("span", `pill state-${n.state}`, n.state);
  state.id = `state-${n.name}`;
  head.append(el("h3", "", n.name), el("span", "pill pill-image", n.image), state);
  card.append(head);

  const facts = el("dl", "facts");
  facts.append(el("dt", "", "os"));
  const os = el("dd", "muted", n.os || "…");
  os.id = `os-${n.name}`;
  os.title = n.os;
  facts.append(os);
  n.nics.forEach((nic, i) => {
    facts.append(el("dt", "", `eth${i}`));
    const dd = el("dd");
    dd.append(el("span", "addr", nic.ip), el("span", "muted", ` on ${nic.network} · ${nic.mac}`));
    facts.append(dd);
    facts.append(el("dt", "", "address"));
    const dhcp = el("dd", "dhcp", nic.dhcp);
    dhcp.id = `dhcp-${n.name}-${nic.mac}`;
    setDhcpClass(dhcp, nic.dhcp);
    facts.append(dhcp);
  });
  facts.append(el("dt", "", "agent"));
  const agent = el("dd", "", "");
  agent.id = `agent-${n.name}`;
  setAgent(agent, n.agent);
  facts.append(agent);
  card.append(facts);

  const body = el("div", "card-body");
  const shot = el("a", "shot");
  shot.id = `shot-${n.name}`;
  shot.href = `/screenshot/${encodeURIComponent(n.name)}`;
  shot.target = "_blank";
  shot.rel = "noopener";
  shot.title = "open the full-size screen";
  shot.append(el("span", "shot-empty", "no screen yet"));
  body.append(shot);
  const con = el("pre", "console");
  con.id = `console-${n.name}`;
  con.tabIndex = 0;
  body.append(con);
  card.append(body);
  if (n.screenshot) setScreenshot(n.name, n.screenshot, n.screenshot_at);
  return card;
}

function setDhcpClass(e, text) {
  e.className = "dhcp " + (text.startsWith("Got") || text.startsWith("static") ? "ok" :
                           text === "waiting" ? "muted" : "busy");
}

function setAgent(e, text) {
  e.className = "agent " + (text === "connected" ? "ok" : text === "disconnected" ? "bad" : "muted");
  e.textContent = text;
}

function setScreenshot(node, uri, at) {
  const a = $(`shot-${node}`);
  if (!a) return;
  let img = a.querySelector("img");
  if (!img) {
    img = el("img");
    img.alt = `${node} screen`;
    a.replaceChildren(img, el("span", "shot-time"));
  }
  img.src = uri;
  a.querySelector(".shot-time").textContent = at ? fmtTime(at).slice(0, 8) : "";
}

function renderNodes(nodes) {
  const box = $("nodes");
  box.replaceChildren(...nodes.map(nodeCard));
  for (const n of nodes) {
    const con = $(`console-${n.name}`);
    for (const line of n.console) con.appendChild(el("div", "line", line));
    con.scrollTop = con.scrollHeight;
  }
}

// ------------------------------------------------------------------ events

function applyEvent(ev) {
  const d = ev.data || {};
  switch (ev.kind) {
    case "step_changed": steps.set(d.key, d); renderSteps(); break;
    case "test_status":
      test.state = d.state || test.state;
      if (test.state !== "running") test.ended_at = ev.time;
      renderTest(); break;
    case "console_output": {
      const con = $(`console-${ev.node}`);
      if (con) appendPinned(con, el("div", "line", ev.message), MAX_CONSOLE_LINES);
      break;
    }
    case "dhcp_discover": case "dhcp_offer": case "dhcp_request": case "dhcp_ack": case "dhcp_nak": {
      const e = $(`dhcp-${ev.node}-${d.mac}`);
      if (!e) break;
      const text = { dhcp_discover: "Discover sent", dhcp_offer: `Offered ${d.ip}`,
                     dhcp_request: `Requesting ${d.ip}`, dhcp_ack: `Got ${d.ip}`,
                     dhcp_nak: "Refused (NAK)" }[ev.kind];
      e.textContent = text; setDhcpClass(e, text); break;
    }
    case "nic_static": {
      const e = $(`dhcp-${ev.node}-${d.mac}`);
      if (e) { e.textContent = `static ${d.ip} (host channel)`; e.className = "dhcp ok"; }
      break;
    }
    case "agent_connected": case "agent_disconnected": {
      const e = $(`agent-${ev.node}`);
      if (e) setAgent(e, ev.kind === "agent_connected" ? "connected" : "disconnected");
      if (ev.kind === "agent_connected") setNodeState(ev.node, "running");
      break;
    }
    case "node_state": {
      setNodeState(ev.node, d.state);
      const os = $(`os-${ev.node}`);
      if (os && d.os) { os.textContent = d.os; os.title = d.os; }
      break;
    }
    case "screenshot": setScreenshot(ev.node, d.thumbnail, ev.time); break;
  }
}

function setNodeState(node, state) {
  const e = $(`state-${node}`);
  if (e && state) { e.className = `pill state-${state}`; e.textContent = state; }
}

function logEvent(ev) {
  if (ev.kind === "screenshot") return;
  const row = el("div", `event event-${ev.kind}`);
  row.append(el("span", "ev-time", fmtTime(ev.time)),
             el("span", "ev-node", ev.node ? ev.node : "env"),
             el("span", "ev-kind", ev.kind.replace("_", " ")),
             el("span", "ev-msg", ev.message));
  appendPinned($("events"), row, MAX_EVENTS);
}

function applyState(s) {
  stateSeq = s.seq;
  test = s.test;
  steps.clear();
  for (const st of s.steps) steps.set(st.key, st);
  renderTest();
  renderSteps();
  renderNodes(s.nodes);
  $("events").replaceChildren();
}

// ------------------------------------------------------------------ connection

function setConn(state, text) {
  const c = $("conn");
  c.className = `conn conn-${state}`;
  c.textContent = text;
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => setConn("live", "live");
  ws.onmessage = (msg) => {
    const m = JSON.parse(msg.data);
    if (m.type === "state") { applyState(m); return; }
    if (m.seq > stateSeq) applyEvent(m);
    logEvent(m);
  };
  ws.onclose = () => {
    setConn("down", "reconnecting");
    setTimeout(connect, 1000);
  };
}

setInterval(tick, 100);
connect();
