// A small frontend for convai-gateway: sign in with a JWT, talk to an agent with @elevenlabs/client using a
// signed URL minted by the gateway, then list "my conversations" and send like/dislike through the gateway.
// The page never sees the ElevenLabs API key: every call carries only the user's bearer token.

const { Conversation } = globalThis.ElevenLabsClient;
const $ = (id) => document.getElementById(id);

// config.json is written by `convai-gateway dev`; a real deployment would bake these in at build time.
const config = await fetch("config.json").then((response) => response.json());
$("gateway-url").textContent = config.gatewayUrl;
$("agent-id").textContent = config.agentId;

let session = null; // { token, userId }
let conversation = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// Read the subject from the token for display and as the conversation's user_id. The gateway verifies the
// token; the page only needs to know who it is acting for.
function subjectOf(token) {
  const part = token.split(".")[1] ?? "";
  const base64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
  const claims = JSON.parse(atob(base64));
  if (typeof claims.sub !== "string" || !claims.sub) throw new Error("the token has no sub claim");
  return claims.sub;
}

// Every gateway call: bearer token in, problem+json errors out as exceptions with the server's detail.
async function gateway(path, { method = "GET", body } = {}) {
  const { token } = session;
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(path, config.gatewayUrl), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    // The token expired (or was revoked) while the page stayed open: every later call would be refused too, so
    // forget it and ask for a new sign-in. Only if it is still the current token: a newer sign-in stays.
    if (session?.token === token) await signOut();
    throw new Error(`${method} ${path}: 401 ${data?.detail ?? "unauthorized"}. Sign in again.`);
  }
  if (!response.ok) {
    throw new Error(`${method} ${path}: ${response.status} ${data?.detail ?? data?.title ?? ""}`.trim());
  }
  return data;
}

function setSignedIn(signedIn) {
  document.body.classList.toggle("signed-in", signedIn);
  $("who").textContent = signedIn ? `Signed in as ${session.userId}` : "Signed out";
  $("sign-out").hidden = !signedIn;
  $("sign-in").disabled = signedIn;
}

function setStatus(status) {
  $("status").textContent = status;
  const live = status === "connected";
  $("start").disabled = status !== "disconnected";
  $("end").disabled = !live;
  $("message").disabled = !live;
  $("send").disabled = !live;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("b");
  who.textContent = role === "agent" ? "Agent" : role === "user" ? "You" : "·";
  item.append(who, " ", text);
  $("messages").append(item);
  item.scrollIntoView({ block: "nearest" });
}

async function devToken(event) {
  event.preventDefault();
  showError("");
  const user = $("user").value.trim();
  try {
    const response = await fetch(`dev-token?sub=${encodeURIComponent(user)}`);
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail ?? `dev token: ${response.status}`);
    $("token").value = data.token;
  } catch (error) {
    showError(`Could not get a dev token: ${error.message}`);
  }
}

async function signIn(event) {
  event.preventDefault();
  showError("");
  const token = $("token").value.trim();
  try {
    session = { token, userId: subjectOf(token) };
  } catch (error) {
    showError(`That does not look like a JWT: ${error.message}`);
    return;
  }
  // From here the token lives only in `session` (module memory). Left in the form, it would stay readable from the
  // DOM and Chromium would save it with the page's form state (session history, the on-disk session restore) and
  // put it back into the page loaded after a back navigation.
  $("token").value = "";
  setSignedIn(true);
  await refresh();
}

async function signOut() {
  // Forget the token first: ending a live conversation runs onDisconnect, whose refresh() must not use it again.
  session = null;
  await conversation?.endSession();
  $("token").value = "";
  $("conversations").tBodies[0].replaceChildren();
  $("messages").replaceChildren();
  setSignedIn(false);
}

async function start() {
  showError("");
  setStatus("connecting");
  const voice = document.querySelector("input[name=mode]:checked").value === "voice";
  addMessage("system", `Starting a ${voice ? "voice" : "text"} conversation…`);
  try {
    // The gateway checks the token and the agent allowlist, mints the signed URL with its own API key and
    // records the conversation as ours in its ownership ledger.
    const minted = await gateway(`/v1/convai/conversation/get-signed-url?agent_id=${encodeURIComponent(config.agentId)}`);
    $("conversation-id").textContent = minted.conversation_id ?? "–";
    conversation = await Conversation.startSession({
      signedUrl: minted.signed_url,
      userId: session.userId,
      textOnly: !voice,
      // The audio worklets from this page's origin (served next to it), so the CSP's script-src stays 'self':
      // by default the client loads them from blob: or data: URLs.
      workletPaths: {
        rawAudioProcessor: new URL("vendor/raw-audio-processor.js", location.href).href,
        audioConcatProcessor: new URL("vendor/audio-concat-processor.js", location.href).href,
      },
      onStatusChange: ({ status }) => setStatus(status),
      onConnect: ({ conversationId }) => {
        $("conversation-id").textContent = conversationId;
        addMessage("system", voice ? "Connected: speak into the microphone." : "Connected: type a message.");
      },
      onMessage: ({ role, message }) => addMessage(role, message),
      onError: (message) => showError(message),
      onDisconnect: () => {
        conversation = null;
        addMessage("system", "Conversation ended.");
        refresh();
      },
    });
  } catch (error) {
    conversation = null;
    setStatus("disconnected");
    showError(`Could not start the conversation: ${error.message}`);
  }
}

function say(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || !conversation) return;
  conversation.sendUserMessage(text);
  addMessage("user", text);
  $("message").value = "";
}

function feedbackButton(id, score, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `feedback ${score}`;
  button.textContent = label;
  button.addEventListener("click", () => sendFeedback(id, score, button.closest("tr")));
  return button;
}

async function sendFeedback(id, score, row) {
  showError("");
  try {
    await gateway(`/v1/convai/conversations/${encodeURIComponent(id)}/feedback`, {
      method: "POST",
      body: { feedback: score },
    });
    // Read it back through the gateway, so what the page shows is what upstream recorded.
    const details = await gateway(`/v1/convai/conversations/${encodeURIComponent(id)}`);
    row.querySelector(".recorded").textContent = details.metadata?.feedback?.overall_score ?? "none";
    row.querySelectorAll("button.feedback").forEach((button) => {
      button.setAttribute("aria-pressed", String(button.classList.contains(score)));
    });
  } catch (error) {
    showError(`Feedback failed: ${error.message}`);
  }
}

function renderRow(item) {
  const row = document.createElement("tr");
  row.dataset.id = item.conversation_id;
  const cells = [
    new Date(item.start_time_unix_secs * 1000).toLocaleString(),
    item.call_summary_title ?? item.conversation_id,
    item.status,
    String(item.message_count ?? ""),
  ].map((text) => {
    const cell = document.createElement("td");
    cell.textContent = text;
    return cell;
  });
  cells[1].title = item.conversation_id;
  cells[2].className = "state";
  const feedback = document.createElement("td");
  const recorded = document.createElement("span");
  recorded.className = "recorded";
  feedback.append(
    feedbackButton(item.conversation_id, "like", "Like"),
    feedbackButton(item.conversation_id, "dislike", "Dislike"),
    recorded,
  );
  row.append(...cells, feedback);
  return row;
}

async function refresh() {
  if (!session) return;
  $("history-status").textContent = "Loading…";
  try {
    // The gateway forces user_id to the token's subject: this is the caller's own history only.
    const page = await gateway("/v1/convai/conversations?page_size=20");
    $("conversations").tBodies[0].replaceChildren(...page.conversations.map(renderRow));
    const count = page.conversations.length;
    $("history-status").textContent = count ? `${count} conversation(s)` : "No conversations yet";
  } catch (error) {
    $("history-status").textContent = "";
    showError(`Could not list conversations: ${error.message}`);
  }
}

$("dev-token-form").addEventListener("submit", devToken);
$("signin-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
$("start").addEventListener("click", start);
$("end").addEventListener("click", () => conversation?.endSession());
$("say-form").addEventListener("submit", say);
$("refresh").addEventListener("click", refresh);
setSignedIn(false);
setStatus("disconnected");
document.body.dataset.ready = "true";
