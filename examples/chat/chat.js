// The chat page's logic (index.html): connects with the client key of ?key=, joins rooms
// through the chat service (REQ chat.join / chat.leave / chat.members, see service.py),
// shows each room's messages, its "joined"/"left" notices and its member list.
//
// The page never subscribes by itself: the service subscribes it to room.<name> (INT SUB),
// so the room's messages arrive at mm.onmessage. Notices are messages with an `event`
// header published by the service; one from anyone else is shown as an ordinary message.
import { connect } from "./middleman.js";

const params = new URLSearchParams(location.search);
const server = params.get("server") || document.querySelector('meta[name="middleman-url"]').content;
const key = params.get("key") || "";

const statusEl = document.getElementById("status");
const joinForm = document.getElementById("join");
const roomsEl = document.getElementById("rooms");
const template = document.getElementById("room-template");

/** The page's state, also for tests and the browser console. */
const chat = {
  mm: null,
  cid: null,
  /** The chat service's cid (of its answers): only its messages are notices. */
  service: null,
  /** room name -> { name, topic, invite, el, log, members, seq } */
  rooms: new Map(),
  /** Every server error not tied to a request: { reason, cmd, target }. */
  errors: [],
  /** Every message that arrived outside a request: { cmd, target, cid, uid, event, body }. */
  received: [],
  ready: false,
};
window.chat = chat;

function status(text, isError = false) {
  statusEl.textContent = text;
  statusEl.className = isError ? "error" : "";
}

/** Messages of a room whose join answer has not arrived yet (the service publishes the
 *  "joined" notice before it answers). */
const early = new Map();

function roomOfTopic(topic) {
  for (const r of chat.rooms.values()) if (r.topic === topic) return r;
  return undefined;
}

function append(room, li) {
  room.log.append(li);
  room.log.scrollTop = room.log.scrollHeight;
}

function show(room, m) {
  const event = m.header("event");
  if (event && chat.service && m.cid === chat.service) {
    const nick = m.header("nick") || m.header("member") || "someone";
    const li = document.createElement("li");
    li.className = "notice";
    li.textContent = event === "join" ? `${nick} joined` : `${nick} left`;
    const reason = m.header("reason");
    if (reason) li.title = reason;
    append(room, li);
    refreshMembers(room);
    return;
  }
  const li = document.createElement("li");
  li.className = "msg";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = m.uid || m.cid || "?";
  li.append(who, ": ", m.body);
  append(room, li);
}

function renderMembers(room, members) {
  const items = members.map(({ cid, nick }) => {
    const li = document.createElement("li");
    li.textContent = nick || cid;
    li.dataset.cid = cid;
    if (cid === chat.cid) li.className = "me";
    return li;
  });
  room.members.replaceChildren(...items);
}

async function refreshMembers(room) {
  const seq = ++room.seq;
  try {
    const res = await chat.mm.request("chat.members", "", { headers: { room: room.name }, timeoutMs: 10000 });
    if (res.header("error") || seq !== room.seq || chat.rooms.get(room.name) !== room) return;
    renderMembers(room, JSON.parse(res.body).members);
  } catch (e) {
    status(`member list of ${room.name}: ${e.message}`, true);
  }
}

function roomView(name) {
  let room = chat.rooms.get(name);
  if (room) return room;
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.room = name;
  room = {
    name,
    topic: `room.${name}`,
    invite: null,
    el,
    log: el.querySelector(".log"),
    members: el.querySelector(".members"),
    seq: 0,
  };
  el.querySelector(".name").textContent = name;
  el.querySelector(".leave").onclick = () => leave(room);
  const say = el.querySelector(".say");
  say.onsubmit = (ev) => {
    ev.preventDefault();
    chat.mm.publish(room.topic, say.text.value);
    say.text.value = "";
  };
  chat.rooms.set(name, room);
  roomsEl.append(el);
  return room;
}

async function join(nick, name, invite) {
  const headers = { room: name, nick };
  if (invite) headers.invite = invite;
  let res;
  try {
    res = await chat.mm.request("chat.join", "", { headers, timeoutMs: 10000 });
  } catch (e) {
    status(`join ${name}: ${e.message}`, true);
    return false;
  }
  const refused = res.header("error");
  if (refused) {
    status(`join ${name} refused: ${refused}`, true);
    return false;
  }
  chat.service = res.cid;
  const info = JSON.parse(res.body);
  const room = roomView(info.room);
  room.topic = info.topic;
  room.nick = nick;
  room.invite = info.invite ?? null;
  room.el.querySelector(".invite").textContent = room.invite ? `invite code: ${room.invite}` : "";
  renderMembers(room, info.members);
  for (const m of early.get(room.topic) ?? []) show(room, m);
  early.delete(room.topic);
  status(`joined ${info.room} as ${nick}`);
  return true;
}

async function leave(room) {
  try {
    const res = await chat.mm.request("chat.leave", "", { headers: { room: room.name }, timeoutMs: 10000 });
    const refused = res.header("error");
    if (refused) status(`leave ${room.name}: ${refused}`, true);
    else status(`left ${room.name}`);
  } catch (e) {
    status(`leave ${room.name}: ${e.message}`, true);
  }
  chat.rooms.delete(room.name);
  room.el.remove();
}

joinForm.onsubmit = async (ev) => {
  ev.preventDefault();
  const ok = await join(joinForm.nick.value.trim(), joinForm.room.value.trim(), joinForm.invite.value.trim());
  if (ok) {
    joinForm.room.value = "";
    joinForm.invite.value = "";
  }
};

async function start() {
  if (!key) {
    status("add ?key=<client key> to the address", true);
    joinForm.hidden = true;
    return;
  }
  let mm;
  try {
    mm = await connect(server, key, { reconnect: true });
  } catch (e) {
    status(`cannot connect to ${server}: ${e.message}`, true);
    return;
  }
  chat.mm = mm;
  chat.cid = mm.cid;
  mm.onmessage = (m) => {
    chat.received.push({
      cmd: m.cmd,
      target: m.target,
      cid: m.cid ?? null,
      uid: m.uid ?? null,
      event: m.header("event") ?? null,
      body: m.body,
    });
    if (m.cmd !== "PUB") return;
    const room = roomOfTopic(m.target);
    if (room) show(room, m);
    else if (m.target.startsWith("room.")) {
      const list = early.get(m.target) ?? [];
      if (list.length < 100) list.push(m);
      early.set(m.target, list);
    }
  };
  mm.onerror = (e) => {
    chat.errors.push({ reason: e.reason, cmd: e.cmd, target: e.target });
    status(`error: ${e.reason} (${e.cmd} ${e.target})`, true);
  };
  mm.onclose = ({ reconnecting }) => status(reconnecting ? "disconnected, reconnecting..." : "disconnected", true);
  mm.onopen = async ({ cid, reconnected }) => {
    chat.cid = cid;
    if (!reconnected) return;
    // The server forgot this connection's rooms: join them again.
    status(`reconnected as ${cid}`);
    for (const room of [...chat.rooms.values()]) await join(room.nick, room.name, room.invite);
  };
  status(`connected as ${mm.cid}`);
  chat.ready = true;
}

start();
