// rillet's page: a chat over /ws (the multiplexed JSON protocol) and TGI's demo of the same
// prompt streamed and not streamed. No framework and nothing from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
if (query.get("api_key")) $("api-key").value = query.get("api_key");
for (const [param, id] of [["temperature", "temperature"], ["max_tokens", "max-tokens"]]) {
  if (query.get(param) !== null) $(id).value = query.get(param);
}

// ---- one socket, many generations (each frame carries its generation's id) -------------

let socket = null;
let opening = null;
const listeners = new Map();
let nextId = 1;

function apiKey() {
  return $("api-key").value.trim();
}

function openSocket() {
  if (socket && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
  if (opening) return opening;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const key = apiKey() ? `?api_key=${encodeURIComponent(apiKey())}` : "";
  opening = new Promise((resolve, reject) => {
    const ws = new WebSocket(`${scheme}://${location.host}/ws${key}`);
    ws.onopen = () => { socket = ws; opening = null; resolve(ws); };
    ws.onerror = () => { opening = null; reject(new Error("cannot open the WebSocket (is the API key right?)")); };
    ws.onclose = () => {
      socket = null;
      for (const listener of listeners.values()) {
        listener({ type: "error", error: "the connection closed", error_type: "connection" });
      }
      listeners.clear();
    };
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      const listener = listeners.get(frame.id);
      if (!listener) return;
      if (frame.type === "done" || frame.type === "error") listeners.delete(frame.id);
      listener(frame);
    };
  });
  return opening;
}

async function generate(fields, onFrame) {
  const ws = await openSocket();
  const id = `g${nextId++}`;
  listeners.set(id, onFrame);
  ws.send(JSON.stringify({ type: "generate", id, ...fields }));
  return id;
}

function cancel(id) {
  if (socket && id) socket.send(JSON.stringify({ type: "cancel", id }));
}

function sampling() {
  return {
    max_tokens: Number($("max-tokens").value) || 512,
    temperature: Number($("temperature").value),
  };
}

// ---- chat -----------------------------------------------------------------------------

const conversation = [];
let current = null;

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  box.innerHTML = '<div class="role"></div><div class="text"></div>';
  box.querySelector(".role").textContent = role;
  box.querySelector(".text").textContent = text;
  $("history").appendChild(box);
}

function busy(running) {
  $("send").disabled = running;
  $("stop").disabled = !running;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || current) return;
  if ($("output").textContent) addMessage("assistant", $("output").textContent);
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  $("prompt").value = "";
  $("output").textContent = "";
  $("stats").textContent = "…";
  busy(true);
  const start = performance.now();
  let first = null;
  let reply = "";
  try {
    current = await generate({ messages: conversation, ...sampling() }, (frame) => {
      if (frame.type === "token") {
        if (first === null) first = performance.now();
        reply += frame.text;
        $("output").textContent = reply;
        return;
      }
      current = null;
      busy(false);
      if (frame.type === "error") {
        conversation.pop();
        $("stats").textContent = `error (${frame.error_type}): ${frame.error}`;
        return;
      }
      conversation.push({ role: "assistant", content: reply });
      $("stats").textContent = describe(frame, start, first);
    });
  } catch (error) {
    current = null;
    busy(false);
    conversation.pop();
    $("stats").textContent = String(error.message || error);
  }
}

function describe(done, start, first) {
  const end = performance.now();
  const tokens = done.usage.completion_tokens;
  const parts = [done.finish_reason === "cancelled" ? "stopped" : `finished (${done.finish_reason})`];
  if (first !== null) {
    parts.push(`TTFT ${Math.round(first - start)} ms`);
    const seconds = (end - first) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  }
  parts.push(`${tokens} tokens`);
  return parts.join(" · ");
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => cancel(current));
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    send();
  }
});
$("clear").addEventListener("click", () => {
  if (current) return;
  conversation.length = 0;
  $("history").textContent = "";
  $("output").textContent = "";
  $("stats").textContent = "";
});

// ---- the demo: the same prompt, streamed and not, sent at the same moment -----------------

async function compare() {
  const text = $("prompt").value.trim() || "Write a short poem about a river.";
  const messages = [{ role: "user", content: text }];
  // One seed for both sides: sampled or not, they draw the same tokens, so the two texts
  // are the same and only their timing differs (as the caption says).
  const seed = Math.floor(Math.random() * 2 ** 31);
  const fields = { messages, seed, ...sampling() };
  $("streamed").textContent = "";
  $("buffered").textContent = "";
  $("streamed-time").textContent = "";
  $("buffered-time").textContent = "";
  $("compare").disabled = true;
  const start = performance.now();
  const elapsed = () => `${((performance.now() - start) / 1000).toFixed(2)} s`;
  let pending = 2;
  const finished = () => { if (--pending === 0) $("compare").disabled = false; };

  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const buffered = fetch("/v1/chat/completions", {
    method: "POST",
    headers,
    body: JSON.stringify({ ...fields, stream: false }),
  })
    .then(async (response) => {
      const body = await response.json();
      $("buffered").textContent = response.ok ? body.choices[0].message.content : `error: ${body.error.message}`;
    })
    .catch((error) => { $("buffered").textContent = `error: ${error.message}`; })
    .finally(() => { $("buffered-time").textContent = `done in ${elapsed()}`; finished(); });

  let firstToken = true;
  try {
    await generate(fields, (frame) => {
      if (frame.type === "token") {
        if (firstToken) { firstToken = false; $("streamed-time").textContent = `first token ${elapsed()}`; }
        $("streamed").textContent += frame.text;
        return;
      }
      if (frame.type === "error") $("streamed").textContent += `\nerror: ${frame.error}`;
      $("streamed-time").textContent += ` · done in ${elapsed()}`;
      finished();
    });
  } catch (error) {
    $("streamed").textContent = String(error.message || error);
    finished();
  }
  await buffered;
}

$("compare").addEventListener("click", compare);

fetch("/info")
  .then((response) => response.json())
  .then((info) => { $("model").textContent = info.model_id; })
  .catch(() => {});
