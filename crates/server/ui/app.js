// kvserve's web page: a chat with the model, and a live view of the cache.
// Plain JavaScript, no build step and no library: the page is served from
// the binary (`server/src/ui.rs`) under a strict Content-Security-Policy
// (no inline script or style, no other origin). Model and user text only
// ever reach the page as text nodes (`renderMarkdown` builds elements with
// the DOM API; nothing is parsed as HTML).
"use strict";

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const KEY = "kvserve-api-key";
const POLL_MS = 1000;
const LOCATIONS = ["pool", "ram", "disk", "remote", "none"];

// ---------------------------------------------------------------- markdown

// A small Markdown subset rendered safely: fenced code blocks, headings,
// bullet and numbered lists, paragraphs, and inline code, bold and italics.
// Returns a DocumentFragment; every piece of text is a text node.
function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence (or the end of an answer still streaming)
      const pre = document.createElement("pre");
      const c = document.createElement("code");
      if (fence[1]) c.dataset.lang = fence[1];
      c.textContent = code.join("\n");
      pre.append(c);
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement(`h${Math.min(heading[1].length + 2, 6)}`);
      inline(h, heading[2]);
      out.append(h);
      i++;
      continue;
    }
    const item = /^\s*(?:[-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(item, ""));
        list.append(li);
        i++;
      }
      out.append(list);
      continue;
    }
    if (line.trim() === "") {
      i++;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() !== "" && !/^\s*```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i]) && !item.test(lines[i])) {
      para.push(lines[i++]);
    }
    const p = document.createElement("p");
    para.forEach((l, k) => {
      if (k > 0) p.append(document.createElement("br"));
      inline(p, l);
    });
    out.append(p);
  }
  return out;
}

// Inline code, **bold** and *italics* inside `parent`, as text nodes.
function inline(parent, text) {
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const token = m[0];
    let el;
    if (token.startsWith("`")) {
      el = document.createElement("code");
      el.textContent = token.slice(1, -1);
    } else if (token.startsWith("**")) {
      el = document.createElement("strong");
      el.textContent = token.slice(2, -2);
    } else {
      el = document.createElement("em");
      el.textContent = token.slice(1, -1);
    }
    parent.append(el);
    last = m.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// ---------------------------------------------------------------- API key

function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function askForKey(message) {
  const prompt = $("key-prompt");
  prompt.hidden = false;
  document.getElementById("key-error").textContent = message || "";
  $("key-input").focus();
}

function setUpKey() {
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-prompt").hidden = true;
    poll();
  });
  $("key-button").addEventListener("click", () => askForKey(""));
}

// ---------------------------------------------------------------- chat

const chat = { messages: [], controller: null };

function newAgentId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.dataset.testid = "chat-message";
  li.dataset.role = role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text;
  li.append(body);
  $("chat-messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setStreaming(on) {
  $("chat-stop").disabled = !on;
  $("chat-send").disabled = on;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function send() {
  const text = $("chat-input").value;
  if (!text.trim() || chat.controller) return;
  $("chat-input").value = "";
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const li = addMessage("assistant", "");
  const body = li.querySelector(".body");
  const system = $("system-prompt").value.trim();
  const request = {
    model: document.body.dataset.model || "default",
    messages: (system ? [{ role: "system", content: system }] : []).concat(chat.messages),
    stream: true,
    stream_options: { include_usage: true },
    agent_id: $("agent-id").value.trim(),
  };
  const temperature = numberOrNull("temperature");
  const maxTokens = numberOrNull("max-tokens");
  const seed = numberOrNull("seed");
  if (temperature !== null) request.temperature = temperature;
  if (maxTokens !== null) request.max_tokens = maxTokens;
  if (seed !== null) request.seed = seed;
  const controller = new AbortController();
  chat.controller = controller;
  setStreaming(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let answer = "";
  let usage = null;
  let finish = null;
  let failed = null;
  let pending = false;
  const draw = () => {
    pending = false;
    body.replaceChildren(renderMarkdown(answer));
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      if (response.status === 401) askForKey("The key was not accepted.");
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) {
              last = performance.now();
              if (first === null) first = last;
              answer += piece;
              if (!pending) {
                pending = true;
                requestAnimationFrame(draw);
              }
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failed = e.message;
  } finally {
    chat.controller = null;
    setStreaming(false);
  }
  draw();
  if (failed) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = failed;
    body.append(p);
  }
  if (answer) chat.messages.push({ role: "assistant", content: answer });
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.dataset.testid = "answer-stats";
  const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens || 0 : 0;
  stats.dataset.cachedTokens = String(cached);
  const parts = [];
  if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
  if (usage) {
    const tokens = usage.completion_tokens;
    const secs = first !== null && last > first ? (last - first) / 1000 : 0;
    if (secs > 0 && tokens > 1) parts.push(`${((tokens - 1) / secs).toFixed(1)} tokens/s`);
    parts.push(`${tokens} tokens`);
    parts.push(`${cached} of ${usage.prompt_tokens} prompt tokens from the cache`);
  }
  if (finish) parts.push(finish === "stopped" ? "stopped" : `finish: ${finish}`);
  stats.textContent = parts.join(" · ");
  li.append(stats);
  li.scrollIntoView({ block: "end" });
}

function setUpChat() {
  $("agent-id").value = newAgentId();
  document.getElementById("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("chat-stop").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    $("chat-messages").replaceChildren();
    $("agent-id").value = newAgentId();
  });
}

// ---------------------------------------------------------------- cache view

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

// Rates between consecutive samples of the server's history.
function series(history, pick) {
  const points = [];
  for (let k = 1; k < history.length; k++) {
    const a = history[k - 1];
    const b = history[k];
    const dt = (b.t_ms - a.t_ms) / 1000;
    if (dt <= 0) continue;
    points.push([b.t_ms, pick(a, b, dt)]);
  }
  return points;
}

function chart(el, points, spanMs) {
  el.replaceChildren();
  if (points.length === 0) return;
  const end = points[points.length - 1][0];
  const values = points.map((p) => p[1]).filter((v) => v !== null);
  const max = Math.max(1, ...values);
  const line = points
    .filter((p) => p[1] !== null)
    .map(([t, v]) => `${(300 * (1 - (end - t) / spanMs)).toFixed(1)},${(78 - (76 * v) / max).toFixed(1)}`)
    .join(" ");
  el.append(svg("polyline", { points: line }));
  const label = svg("text", { x: 3, y: 10 });
  label.textContent = `max ${max >= 100 ? Math.round(max) : max.toFixed(1)}`;
  el.append(label);
}

function showServer(server) {
  const view = document.getElementById("server-view");
  if (!server) {
    view.hidden = true;
    return;
  }
  view.hidden = false;
  const pool = server.pool;
  const used = pool.used_blocks;
  const cached = pool.cached_blocks;
  const total = Math.max(1, pool.total_blocks);
  const bar = document.getElementById("pool-bar");
  bar.replaceChildren();
  for (const [n, color, what] of [[used, "var(--pool)", "held"], [cached, "var(--ram)", "cached"]]) {
    const s = document.createElement("span");
    s.style.width = `${(100 * n) / total}%`;
    s.style.background = color;
    s.title = `${n} blocks ${what}`;
    bar.append(s);
  }
  document.getElementById("pool-text").textContent =
    `${used} blocks held by sequences, ${cached} cached for reuse, ${pool.free_blocks} free, of ${pool.total_blocks} ` +
    `(${pool.block_size} tokens each) · prefix hit rate ${(100 * server.prefix_hit_rate).toFixed(1)}%` +
    (server.sliding_pages
      ? ` · sliding-window layers: ${server.sliding_pages.held} of ${server.sliding_pages.total} pages hold K/V`
      : "");
  $("queue").textContent = `${server.running} running, ${server.waiting} waiting · ${server.tokens_per_second.toFixed(1)} tokens/s`;
  const rows = document.getElementById("tier-rows");
  rows.replaceChildren();
  for (const t of server.tiers) {
    const tr = document.createElement("tr");
    tr.dataset.tier = t.name;
    tr.append(cell(t.name), cell(String(t.blocks), "num"), cell(bytes(t.bytes), "num"),
      cell(`${(100 * t.hit_share).toFixed(1)}%`, "num"));
    rows.append(tr);
  }
  const h = server.history;
  // The last five minutes, or the time since the server started (at least one).
  const kept = h.length > 1 ? h[h.length - 1].t_ms - h[0].t_ms : 0;
  const span = Math.min(5 * 60 * 1000, Math.max(60 * 1000, kept));
  chart(document.getElementById("chart-decode"), series(h, (a, b, dt) => (b.generated - a.generated) / dt), span);
  chart(document.getElementById("chart-prefill"), series(h, (a, b, dt) => (b.prefilled - a.prefilled) / dt), span);
  chart(document.getElementById("chart-ttft"), series(h, (a, b) =>
    b.ttft_count > a.ttft_count ? (1000 * (b.ttft_sum - a.ttft_sum)) / (b.ttft_count - a.ttft_count) : null), span);
}

const deleting = new Map(); // agent id -> time its delete button was first pressed

async function deleteAgent(id, button) {
  const asked = deleting.get(id);
  if (!asked || performance.now() - asked > 4000) {
    deleting.set(id, performance.now());
    button.textContent = "Sure? Delete";
    return;
  }
  deleting.delete(id);
  button.disabled = true;
  const r = await fetch(`/v1/agents/${encodeURIComponent(id)}`, { method: "DELETE", headers: headers(false) });
  if (!r.ok) button.textContent = `failed (${r.status})`;
  poll();
}

function showAgents(agents) {
  const rows = document.getElementById("agent-rows");
  const keep = new Map(Array.from(rows.children, (tr) => [tr.dataset.agentId, tr]));
  rows.replaceChildren();
  for (const a of agents) {
    const b = a.blocks || {};
    const retention = a.retention === "pinned" ? "pinned"
      : a.retention && a.retention.ttl_seconds ? `TTL ${a.retention.ttl_seconds} s` : String(a.retention || "");
    const tr = document.createElement("tr");
    tr.dataset.testid = "agent-row";
    tr.dataset.agentId = a.id;
    const locs = [b.pool || 0, b.ram || 0, b.disk || 0, b.remote || 0].join(" / ");
    tr.append(cell(a.id, "id"), cell(String(a.cached_tokens), "num"), cell(locs, "num"),
      cell(retention + (a.busy ? " · busy" : "")), cell(String(a.turns), "num"));
    const td = document.createElement("td");
    const old = keep.get(a.id);
    const button = old && old.querySelector("button") ? old.querySelector("button") : document.createElement("button");
    if (!old) {
      button.type = "button";
      button.className = "secondary";
      button.textContent = "Delete";
      button.dataset.testid = "agent-delete";
      button.setAttribute("aria-label", `delete agent ${a.id}`);
      button.addEventListener("click", () => deleteAgent(a.id, button));
    }
    td.append(button);
    tr.append(td);
    rows.append(tr);
  }
}

// The prefix tree as an icicle: x is the token position, each node's
// height the share of agents whose conversation runs through it, its colour
// where most of its blocks are.
function showTree(tree) {
  const el = document.getElementById("tree");
  el.replaceChildren();
  const nodes = tree.nodes;
  const total = nodes.filter((n) => n.parent === null).reduce((s, n) => s + n.agents, 0);
  if (total === 0) {
    const t = svg("text", { x: 8, y: 20, fill: "#5d6975" });
    t.textContent = "no agents yet";
    t.style.fill = "#5d6975";
    el.append(t);
    return;
  }
  const width = el.clientWidth || 600;
  const height = Math.max(300, Math.min(1200, total * 12));
  el.setAttribute("viewBox", `0 0 ${width} ${height}`);
  el.style.height = `${height}px`;
  const maxEnd = Math.max(1, ...nodes.map((n) => n.start + n.tokens));
  const children = new Map();
  for (const n of nodes) {
    const k = n.parent === null ? "root" : n.parent;
    if (!children.has(k)) children.set(k, []);
    children.get(k).push(n);
  }
  const unit = height / total;
  const place = (list, y) => {
    for (const n of list) {
      const h = n.agents * unit;
      const x = (width * n.start) / maxEnd;
      const w = Math.max(1, (width * n.tokens) / maxEnd);
      let best = "none";
      for (const l of LOCATIONS) if ((n.blocks[l] || 0) > (n.blocks[best] || 0)) best = l;
      const rect = svg("rect", { x: x.toFixed(1), y: y.toFixed(1), width: w.toFixed(1), height: Math.max(1, h - 1).toFixed(1) });
      rect.setAttribute("class", `loc-${best}`);
      rect.style.fill = `var(--${best})`;
      const title = svg("title");
      const where = LOCATIONS.filter((l) => n.blocks[l]).map((l) => `${n.blocks[l]} ${l}`).join(", ");
      title.textContent = `${n.tokens} tokens (${where || "partial block"}) · ${n.agents} agent(s)` +
        (n.ends.length ? ` · ends here: ${n.ends.join(", ")}` : "");
      rect.append(title);
      el.append(rect);
      if (n.ends.length === 1 && h >= 11 && w > 40) {
        const label = svg("text", { x: (x + 3).toFixed(1), y: (y + Math.min(h, 24) / 2 + 4).toFixed(1) });
        label.textContent = n.ends[0];
        el.append(label);
      }
      // Agents that end here take the top of its range; children the rest.
      place(children.get(n.id) || [], y + n.ends.length * unit);
      y += h;
    }
  };
  place(children.get("root") || [], 0);
}

let polling = false;

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const r = await fetch("/v1/dashboard", { headers: headers(false) });
    if (r.status === 401) {
      $("key-button").hidden = false;
      askForKey(apiKey() ? "The key was not accepted." : "");
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const state = await r.json();
    document.body.dataset.model = state.model;
    $("model-name").textContent = state.model;
    $("key-button").hidden = !state.keys_required;
    const notice = $("cache-notice");
    notice.hidden = !!state.server;
    notice.textContent = state.server ? "" : "Server-wide numbers need the metrics key; this view shows your tenant's agents.";
    showServer(state.server);
    showAgents(state.agents);
    showTree(state.tree);
  } catch (e) {
    const notice = $("cache-notice");
    notice.hidden = false;
    notice.textContent = `The cache view could not refresh: ${e.message}`;
  } finally {
    polling = false;
  }
}

window.kvserveRender = renderMarkdown;

document.addEventListener("DOMContentLoaded", () => {
  setUpKey();
  setUpChat();
  poll();
  setInterval(poll, POLL_MS);
});
