// The example page: connect with a token, join workspace:<id>, show its live events
// and who is present.  Uses the compiled TypeScript client as a plain ES module.
//
// The URL fragment may carry everything, e.g.
//   index.html#token=<jwt>&workspace=42&ws=ws://127.0.0.1:8765/ws
// (a fragment never reaches the server's logs).  `tokenUrl=<url>` instead of
// `token=` makes the page fetch a fresh token from that URL on every
// (re)connect and before expiry -- the tokenProvider pattern an application uses.
import { UnrealonClient } from "../../clients/typescript/dist/index.js";

const $ = (id) => document.getElementById(id);
const form = $("connect");
const params = new URLSearchParams(location.hash.slice(1));
for (const name of ["ws", "token", "workspace"]) {
  if (params.get(name)) form.elements[name].value = params.get(name);
}

let client = null;

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function addEvent(name, data, meta) {
  const li = document.createElement("li");
  li.dataset.event = name;
  if (meta.replayed) li.className = "replayed";
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const body = document.createElement("code");
  body.textContent = JSON.stringify(data); // text, never HTML: data comes from the network
  li.append(label, body);
  $("events").prepend(li);
}

function showPresence(users) {
  const list = $("presence");
  list.replaceChildren();
  for (const user of users) addUser(user.user_id);
}

function addUser(userId) {
  if ([...$("presence").children].some((li) => li.dataset.user === userId)) return;
  const li = document.createElement("li");
  li.dataset.user = userId;
  li.textContent = userId;
  $("presence").append(li);
}

function removeUser(userId) {
  for (const li of [...$("presence").children]) if (li.dataset.user === userId) li.remove();
}

async function start({ ws, token, tokenUrl, workspace }) {
  client?.close();
  const room = `workspace:${workspace}`;
  document.body.dataset.joined = "";
  $("events").replaceChildren();
  $("presence").replaceChildren();
  const provider = tokenUrl ? async () => (await fetch(tokenUrl, { cache: "no-store" })).text() : undefined;
  const c = new UnrealonClient({ url: ws, token: provider ? undefined : token, tokenProvider: provider });
  client = c;

  c.on("state", (s) => {
    const why = s.code ? ` (${s.code}${s.reason ? ": " + s.reason : ""})` : "";
    const user = c.userId ? ` as ${c.userId}` : "";
    setStatus(s.state, s.state === "open" ? `connected${user}, in ${room}` : s.state + why);
  });
  c.on("error", (e) => console.warn("unrealon:", e));
  for (const name of ["workspace.file_changed", "workspace.snapshot_created", "workspace.state_changed"]) {
    c.on(name, (data, meta) => meta.room === room && addEvent(name, data, meta));
  }
  c.onAny((name, data, meta) => {
    // events the generated client has no type for (e.g. the backend's generic `publish`)
    if (meta.kind === "room" && meta.room === room && !name.startsWith("workspace.")) addEvent(name, data, meta);
  });
  c.on("presence.joined", (p) => p.room === room && addUser(p.user_id));
  c.on("presence.left", (p) => p.room === room && removeUser(p.user_id));
  c.on("recovery", async (info) => {
    if (info.room !== room) return;
    // after a reconnect: the replay was complete, or events were lost and we reload
    $("notice").textContent = info.recovered ? "" : "Some events were missed while disconnected: state reloaded.";
    showPresence((await c.presence.list({ room })).users);
  });

  try {
    await c.connect();
    await c.rooms.join({ room });
    showPresence((await c.presence.list({ room })).users);
    document.body.dataset.joined = room;
  } catch (e) {
    setStatus("closed", `failed: ${e.message}`);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const data = new FormData(form);
  start({ ws: data.get("ws"), token: data.get("token"), workspace: data.get("workspace") });
});

if ((params.get("token") || params.get("tokenUrl")) && form.elements.workspace.value) {
  start({
    ws: form.elements.ws.value,
    token: form.elements.token.value,
    tokenUrl: params.get("tokenUrl"),
    workspace: form.elements.workspace.value,
  });
}
