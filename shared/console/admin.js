// The admin console: signs in with the admin login, then manages keys and
// shows usage, tiers, prices and upstreams through the documented admin
// API. The token lives in this module only (never in storage, a cookie or
// the URL); signing out or reloading drops it.

import { el, fill, byId, show, callApi, ApiError, int, usd, percent, compact, when, relative, card, table, copyText, envLines, isoDay, byModelSeries, requestClassTable, modelCell } from "./common.js";
import { stackedBars, horizontalBars, cacheSplit } from "./chart.js";

// `…/admin/console/admin.js` → `…/admin/`: API paths resolve under the
// page's own stage prefix, whatever it is.
const ADMIN_BASE = new URL("../", import.meta.url);
const RELAY_BASE = new URL("../../", import.meta.url).href.replace(/\/$/, "");

let token = null;
let keys = [];
let tiers = [];
let currentKeyId = null;
let logCursor = null;

async function api(path, options = {}) {
  if (!token) throw new ApiError(401, "not signed in");
  try {
    return await callApi(new URL(path, ADMIN_BASE), { ...options, headers: { authorization: `Bearer ${token}` } });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut("Your session ended: sign in again.");
    }
    throw err;
  }
}

function say(node, message, kind = "") {
  node.className = `status ${kind}`;
  node.textContent = message;
}

function reportError(node, err) {
  say(node, err instanceof Error ? err.message : String(err), "error");
}

// ---------- sign in / out ----------

function basicCredentials(user, password) {
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return `Basic ${btoa(binary)}`;
}

async function signIn(event) {
  event.preventDefault();
  const status = byId("login-status");
  const user = byId("login-user").value;
  const passwordInput = byId("login-password");
  say(status, "Signing in…");
  try {
    const answer = await callApi(new URL("login", ADMIN_BASE), {
      method: "POST",
      headers: { authorization: basicCredentials(user, passwordInput.value) },
    });
    token = answer.access_token;
    passwordInput.value = "";
    say(status, "");
    show(byId("view-login"), false);
    show(byId("nav"));
    show(byId("sign-out"));
    await loadTiers();
    openView("keys");
  } catch (err) {
    reportError(status, err);
  }
}

function signOut(message = "") {
  token = null;
  keys = [];
  currentKeyId = null;
  for (const id of ["keys-table", "usage-body", "key-body", "models-body", "tiers-body", "prices-body", "upstreams-body"]) fill(byId(id));
  for (const dialog of document.querySelectorAll("dialog")) if (dialog.open) dialog.close();
  fill(byId("secret-value"));
  fill(byId("secret-env"));
  document.querySelectorAll("main > section").forEach((s) => show(s, s.id === "view-login"));
  show(byId("nav"), false);
  show(byId("sign-out"), false);
  say(byId("login-status"), message);
  byId("login-password").focus();
}

// ---------- navigation ----------

const VIEWS = {
  keys: loadKeys,
  usage: loadUsage,
  models: loadAliases,
  tiers: loadTiersView,
  prices: loadPrices,
  upstreams: loadUpstreams,
};

function openView(name) {
  document.querySelectorAll("main > section").forEach((s) => show(s, s.id === `view-${name}`));
  document.querySelectorAll("#nav button").forEach((b) => {
    if (b.dataset.view === name) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  });
  const load = VIEWS[name];
  if (load) load();
}

// ---------- keys ----------

async function loadTiers() {
  try {
    tiers = (await api("tiers")).data;
  } catch {
    tiers = [];
  }
  const filter = byId("key-tier");
  fill(filter, el("option", { value: "" }, "all tiers"), tiers.map((t) => el("option", { value: t.name }, t.name)));
}

async function loadKeys() {
  const status = byId("keys-status");
  say(status, "Loading…");
  try {
    const all = [];
    let cursor = null;
    // Every page: the filters and the search work on the whole list.
    for (let page = 0; page < 50; page += 1) {
      const query = new URLSearchParams({ limit: "100" });
      if (cursor) query.set("cursor", cursor);
      const answer = await api(`api-keys?${query}`);
      all.push(...answer.data);
      if (!answer.has_more || !answer.next_cursor) break;
      cursor = answer.next_cursor;
    }
    keys = all;
    say(status, "");
    renderKeys();
  } catch (err) {
    reportError(status, err);
  }
}

/** The highest share of any limit the key has used (tokens or dollars). */
function highestUse(key) {
  const shares = [];
  if (key.token_limit) shares.push(key.tokens_used / key.token_limit);
  for (const b of key.budgets || []) {
    if (b.limit_micro_usd > 0) shares.push(b.used_micro_usd / b.limit_micro_usd);
  }
  return shares.length ? Math.max(...shares) : 0;
}

function keyMatches(key) {
  const search = byId("key-search").value.trim().toLowerCase();
  const status = byId("key-status").value;
  const tier = byId("key-tier").value;
  const near = byId("key-near").value;
  if (status === "active" && !key.is_active) return false;
  if (status === "disabled" && key.is_active) return false;
  if (tier && key.rate_limit_tier !== tier) return false;
  if (near && highestUse(key) < Number(near) / 100) return false;
  if (search) {
    const haystack = [key.name, key.id, key.prefix, key.description || ""].join(" ").toLowerCase();
    if (!haystack.includes(search)) return false;
  }
  return true;
}

function budgetsText(key) {
  if (!key.budgets || key.budgets.length === 0) return "no dollar limit";
  return key.budgets.map((b) => `${b.window}${b.models ? ` (${b.models})` : ""}: ${usd(b.used_micro_usd)} / ${usd(b.limit_micro_usd)}`).join("\n");
}

function renderKeys() {
  const shown = keys.filter(keyMatches);
  const columns = [
    { label: "Name", name: true },
    { label: "Prefix" },
    { label: "Tier" },
    { label: "Status" },
    { label: "Tokens", num: true },
    { label: "Dollar limits" },
    { label: "Actions" },
  ];
  const rows = shown.map((key) => {
    const use = highestUse(key);
    return [
      el("span", { className: "key-name" }, key.name),
      el("code", {}, key.prefix),
      key.rate_limit_tier,
      el("span", {},
        el("span", { className: `pill ${key.is_active ? "on" : "off"}` }, key.is_active ? "active" : "disabled"),
        use >= 0.8 ? el("span", { className: "pill warn" }, ` ${Math.round(use * 100)} %`) : null),
      `${int(key.tokens_used)}${key.token_limit ? ` / ${int(key.token_limit)}` : ""}`,
      el("span", { className: "pre-line" }, budgetsText(key)),
      el("div", { className: "actions" },
        el("button", { type: "button", onclick: () => openKey(key.id), "aria-label": `Usage of ${key.name}` }, "Usage"),
        el("button", { type: "button", onclick: () => editKey(key), "aria-label": `Edit ${key.name}` }, "Edit"),
        el("button", { type: "button", onclick: () => setActive(key, !key.is_active), "aria-label": `${key.is_active ? "Disable" : "Enable"} ${key.name}` }, key.is_active ? "Disable" : "Enable"),
        el("button", { type: "button", onclick: () => rotateKey(key), "aria-label": `Rotate ${key.name}` }, "Rotate"),
        el("button", { type: "button", className: "danger", onclick: () => deleteKey(key), "aria-label": `Delete ${key.name}` }, "Delete")),
    ];
  });
  const summary = el("p", { className: "muted" }, `${shown.length} of ${keys.length} keys`);
  fill(byId("keys-table"), summary, table(columns, rows, keys.length ? "No key matches." : "No key yet: create one."));
}

function lines(text) {
  return text.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
}

function optionalInteger(id, field) {
  const text = byId(id).value.trim();
  if (text === "") return null;
  if (!/^[0-9]+$/.test(text)) throw new Error(`${field} must be a whole number`);
  return Number(text);
}

function parseBudgets(text) {
  return text.split("\n").map((s) => s.trim()).filter(Boolean).map((line) => {
    const [window, amount, models] = line.split(/\s+/);
    const limit = Number(amount);
    if (!window || !Number.isFinite(limit)) throw new Error(`dollar limit "${line}": write the window, then dollars`);
    const entry = { window, limit_usd: limit };
    if (models) entry.models = models;
    return entry;
  });
}

let editing = null;

function openKeyForm(key) {
  editing = key;
  byId("key-dialog-title").textContent = key ? `Edit ${key.name}` : "Create key";
  fill(byId("f-tier"), tiers.map((t) => el("option", { value: t.name }, t.name)));
  byId("f-name").value = key ? key.name : "";
  byId("f-description").value = key?.description || "";
  byId("f-tier").value = key ? key.rate_limit_tier : (tiers.find((t) => t.name === "basic") ? "basic" : tiers[0]?.name || "");
  byId("f-token-limit").value = key?.token_limit ?? "";
  byId("f-expires").value = key?.expires_at || "";
  byId("f-concurrent").value = key?.max_concurrent ?? "";
  byId("f-mode").value = key?.limit_mode || "soft";
  byId("f-ips").value = (key?.allowed_ips || []).join("\n");
  byId("f-origins").value = (key?.allowed_origins || []).join("\n");
  byId("f-models").value = (key?.allowed_models || []).join("\n");
  const ownLimits = key ? key.dollar_limits : null;
  byId("f-default-budget").checked = !ownLimits;
  byId("f-budgets").value = (ownLimits || []).map((l) => `${l.window} ${l.limit_usd}${l.models ? ` ${l.models}` : ""}`).join("\n");
  say(byId("key-form-status"), "", "error");
  byId("key-dialog").showModal();
  byId("f-name").focus();
}

function formBody() {
  const body = {
    name: byId("f-name").value,
    description: byId("f-description").value.trim() || null,
    rate_limit_tier: byId("f-tier").value,
    token_limit: optionalInteger("f-token-limit", "token limit"),
    expires_at: byId("f-expires").value.trim() || null,
    max_concurrent: optionalInteger("f-concurrent", "most requests in flight"),
    limit_mode: byId("f-mode").value,
    allowed_ips: lines(byId("f-ips").value),
    allowed_origins: lines(byId("f-origins").value),
    allowed_models: lines(byId("f-models").value),
    dollar_limits: byId("f-default-budget").checked ? null : parseBudgets(byId("f-budgets").value),
  };
  if (!editing) {
    // Creation takes absent fields as "none" / "the default".
    for (const [name, value] of Object.entries(body)) if (value === null) delete body[name];
  }
  return body;
}

async function saveKey(event) {
  event.preventDefault();
  const status = byId("key-form-status");
  try {
    const body = formBody();
    if (editing) {
      await api(`api-keys/${encodeURIComponent(editing.id)}`, { method: "PATCH", body });
      byId("key-dialog").close();
      say(byId("keys-status"), `Saved ${body.name}.`, "okay");
    } else {
      const created = await api("api-keys", { method: "POST", body });
      byId("key-dialog").close();
      showSecret(created, "Key created");
    }
    await loadKeys();
  } catch (err) {
    reportError(status, err);
  }
}

function showSecret(key, title) {
  byId("secret-title").textContent = `${title}: ${key.name}`;
  byId("secret-value").textContent = key.api_key;
  byId("secret-env").textContent = envLines([
    { name: "ANTHROPIC_BASE_URL", value: RELAY_BASE },
    { name: "ANTHROPIC_AUTH_TOKEN", value: key.api_key },
    { name: "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", value: "1" },
  ]);
  byId("secret-copied").textContent = "";
  byId("secret-dialog").showModal();
  byId("secret-copy").focus();
}

function closeSecret() {
  // The secret leaves the page with the dialog.
  fill(byId("secret-value"));
  fill(byId("secret-env"));
  byId("secret-dialog").close();
}

function confirmAction(title, text, action) {
  byId("confirm-title").textContent = title;
  byId("confirm-text").textContent = text;
  const dialog = byId("confirm-dialog");
  const yes = byId("confirm-yes");
  const fresh = yes.cloneNode(true);
  yes.replaceWith(fresh);
  fresh.textContent = title.split(" ")[0];
  fresh.addEventListener("click", async () => {
    dialog.close();
    await action();
  });
  dialog.showModal();
  byId("confirm-no").focus();
}

async function setActive(key, active) {
  const status = byId("keys-status");
  try {
    await api(`api-keys/${encodeURIComponent(key.id)}/${active ? "enable" : "disable"}`, { method: "POST" });
    say(status, `${key.name} ${active ? "enabled" : "disabled"}.`, "okay");
    await loadKeys();
  } catch (err) {
    reportError(status, err);
  }
}

function rotateKey(key) {
  confirmAction("Rotate key", `Rotate "${key.name}"? Its current secret stops working at once.`, async () => {
    try {
      const rotated = await api(`api-keys/${encodeURIComponent(key.id)}/rotate`, { method: "POST" });
      showSecret(rotated, "Key rotated");
      await loadKeys();
    } catch (err) {
      reportError(byId("keys-status"), err);
    }
  });
}

function deleteKey(key) {
  confirmAction("Delete key", `Delete "${key.name}" (${key.prefix})? This cannot be undone.`, async () => {
    try {
      await api(`api-keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      say(byId("keys-status"), `Deleted ${key.name}.`, "okay");
      await loadKeys();
    } catch (err) {
      reportError(byId("keys-status"), err);
    }
  });
}

function editKey(key) {
  openKeyForm(key);
}

// ---------- usage charts ----------

/** Spend and tokens per day, each stacked by model (the days' `by_model`). */
function dailyCharts(rows, what) {
  const spend = byModelSeries(rows, "cost_micro_usd");
  const tokens = byModelSeries(rows, "tokens", spend.series.map((s) => s.name));
  return [
    el("h3", {}, `Spend per day by model${what}`),
    el("div", { className: "spend-by-model" },
      stackedBars({ title: `spend per day by model${what}`, labels: spend.labels, series: spend.series, format: usd, namedSeries: true })),
    el("h3", {}, `Tokens per day by model${what}`),
    el("div", { className: "tokens-by-model" },
      stackedBars({ title: `tokens per day by model${what}`, labels: tokens.labels, series: tokens.series, format: compact, namedSeries: true })),
  ];
}

function totalsCards(totals) {
  return el("div", { className: "cards" },
    card("Requests", int(totals.requests), totals.error_requests ? `${int(totals.error_requests)} errors` : null),
    card("Tokens", compact(totals.tokens)),
    card("Spend", usd(totals.cost_micro_usd)),
    card("Cache hit ratio", percent(totals.cache_hit_ratio)),
    card("Saved by caching", usd(totals.cache_saved_micro_usd)));
}

function cacheSection(totals) {
  return [
    el("h3", {}, "Cache efficiency"),
    el("p", { className: "muted" },
      `Prompt tokens read from the cache: ${percent(totals.cache_hit_ratio)}; caching saved ${usd(totals.cache_saved_micro_usd)} against the same traffic uncached.`),
    cacheSplit(totals),
  ];
}

async function loadUsage() {
  const status = byId("usage-status");
  const days = Number(byId("usage-days").value);
  const to = new Date();
  const from = new Date(to.getTime() - (days - 1) * 86400000);
  say(status, "Loading…");
  try {
    const view = await api(`usage?${new URLSearchParams({ from: isoDay(from), to: isoDay(to), top: "10" })}`);
    say(status, "");
    const topRows = view.top_keys.map((k) => [
      el("span", { className: "key-name" }, k.name ?? "(deleted key)"),
      int(k.requests), compact(k.tokens), usd(k.cost_micro_usd), percent(k.cache_hit_ratio),
      el("button", { type: "button", onclick: () => openKey(k.key_id), "aria-label": `Usage of ${k.name ?? k.key_id}` }, "Open"),
    ]);
    fill(byId("usage-body"),
      el("p", { className: "muted" }, `${view.from} to ${view.to} (UTC days) · ${int(view.active_keys)} ${view.active_keys === 1 ? "key" : "keys"} used`),
      totalsCards(view.totals),
      dailyCharts(view.daily, ""),
      cacheSection(view.totals),
      el("h3", {}, "Top keys"),
      table([{ label: "Key", name: true }, { label: "Requests", num: true }, { label: "Tokens", num: true }, { label: "Spend", num: true }, { label: "Cache hits", num: true }, { label: "" }], topRows, "No traffic in this period."));
  } catch (err) {
    reportError(status, err);
  }
}

// ---------- one key ----------

function budgetCards(quota) {
  const cards = [];
  cards.push(card("Tokens used", `${int(quota.tokens_used)}${quota.token_limit ? ` / ${int(quota.token_limit)}` : ""}`,
    quota.token_limit ? `${int(quota.remaining)} left` : "no token limit"));
  for (const b of quota.budgets) {
    cards.push(card(`Dollars, ${b.window}${b.models ? ` (${b.models})` : ""}`, `${usd(b.used_micro_usd)} / ${usd(b.limit_micro_usd)}`,
      `${usd(b.remaining_micro_usd)} left${b.resets_at ? ` · resets ${when(b.resets_at)} (${relative(b.resets_at)})` : ""}`));
  }
  const w = quota.rate_window;
  cards.push(card(`Requests, tier ${quota.rate_limit_tier.name}`, `${int(w.requests_remaining)} left`,
    `of ${int(quota.rate_limit_tier.requests)} per ${quota.rate_limit_tier.period} s${w.resets_at ? ` · resets ${relative(w.resets_at)}` : ""}`));
  if (quota.token_minute) {
    cards.push(card("Tokens this minute", `${int(quota.token_minute.tokens_remaining)} left`, `${int(quota.token_minute.tokens_used)} used`));
  }
  return el("div", { className: "cards" }, cards);
}

function logRows(rows) {
  return rows.map((r) => [
    when(r.at),
    modelCell(r),
    el("span", { className: `pill ${r.status < 400 ? "on" : "off"}` }, String(r.status)),
    int(r.input_tokens), int(r.output_tokens), int(r.cache_read_input_tokens), int(r.cache_creation_input_tokens),
    usd(r.cost_micro_usd), `${int(r.latency_ms)} ms`,
    r.user_agent ?? "—",
  ]);
}

const LOG_COLUMNS = [
  { label: "When" }, { label: "Model", name: true }, { label: "Status" },
  { label: "Input", num: true }, { label: "Output", num: true }, { label: "Cache read", num: true }, { label: "Cache write", num: true },
  { label: "Cost", num: true }, { label: "Latency", num: true }, { label: "Client", name: true },
];

/** The per-model split as bars (spend), from a usage summary. */
function modelBars(summary) {
  const rows = summary.by_model.map((m) => ({ label: m.model, value: m.cost_micro_usd }));
  return rows.length ? horizontalBars({ title: "spend by model", rows, format: usd }) : el("p", { className: "muted" }, "No model used yet.");
}

async function openKey(id) {
  currentKeyId = id;
  logCursor = null;
  document.querySelectorAll("main > section").forEach((s) => show(s, s.id === "view-key"));
  document.querySelectorAll("#nav button").forEach((b) => b.removeAttribute("aria-current"));
  const status = byId("key-status-line");
  byId("key-title").textContent = "Key";
  fill(byId("key-body"));
  say(status, "Loading…");
  const path = `api-keys/${encodeURIComponent(id)}`;
  try {
    const [key, summary, quota, daily, logs, classes] = await Promise.all([
      api(path), api(`${path}/usage`), api(`${path}/usage/quota`), api(`${path}/usage/daily?days=30`), api(`${path}/usage/logs?limit=50`),
      api(`${path}/usage/request-classes`),
    ]);
    if (currentKeyId !== id) return;
    byId("key-title").textContent = `${key.name} (${key.prefix})`;
    say(status, key.is_active ? "" : "This key is disabled.", key.is_active ? "" : "error");
    logCursor = logs.next_cursor;
    const logTable = el("div", { id: "key-log" }, table(LOG_COLUMNS, logRows(logs.data), "No request yet."));
    const more = el("button", { type: "button", id: "key-log-more", className: logs.has_more ? "" : "hidden", onclick: () => moreLogs(id, logTable, more) }, "Older requests");
    fill(byId("key-body"),
      budgetCards(quota),
      totalsCards(summary),
      dailyCharts(daily.data, " (30 days)"),
      el("h3", {}, "By request class (30 days)"),
      requestClassTable(classes),
      el("h3", {}, "Spend by model (all time)"),
      modelBars(summary),
      cacheSection(summary),
      el("h3", {}, "Request log"),
      logTable, more);
  } catch (err) {
    reportError(status, err);
  }
}

async function moreLogs(id, container, button) {
  if (!logCursor) return;
  try {
    const query = new URLSearchParams({ limit: "50", cursor: logCursor });
    const logs = await api(`api-keys/${encodeURIComponent(id)}/usage/logs?${query}`);
    logCursor = logs.next_cursor;
    const body = container.querySelector("tbody");
    if (body) {
      for (const cells of logRows(logs.data)) {
        body.append(el("tr", {}, cells.map((cell, i) => el("td", { className: LOG_COLUMNS[i].num ? "num" : LOG_COLUMNS[i].name ? "name" : "", "data-label": LOG_COLUMNS[i].label }, cell))));
      }
    }
    show(button, logs.has_more);
  } catch (err) {
    reportError(byId("key-status-line"), err);
  }
}

// ---------- tiers, prices, upstreams ----------

async function loadTiersView() {
  const status = byId("tiers-status");
  say(status, "Loading…");
  try {
    const answer = await api("tiers");
    tiers = answer.data;
    say(status, "");
    renderTiers();
  } catch (err) {
    reportError(status, err);
  }
}

function renderTiers() {
  fill(byId("tiers-body"), table(
    [{ label: "Tier", name: true }, { label: "Requests", num: true }, { label: "Per (seconds)", num: true }, { label: "Tokens per minute", num: true }, { label: "" }],
    tiers.map((t) => [t.name, int(t.requests), int(t.period), t.tokens_per_minute ? int(t.tokens_per_minute) : "no limit",
      el("button", { type: "button", onclick: () => editTier(t), "aria-label": `Edit tier ${t.name}` }, "Edit")])));
}

function editTier(tier) {
  byId("t-name").value = tier.name;
  byId("t-requests").value = tier.requests;
  byId("t-period").value = tier.period;
  byId("t-tpm").value = tier.tokens_per_minute ?? "";
  say(byId("tier-form-status"), "");
  byId("t-requests").focus();
}

/** A whole number from a form field, as the API takes it (its own checks name the field). */
function wholeNumber(id, field, optional = false) {
  const text = byId(id).value.trim();
  if (text === "" && optional) return null;
  if (!/^[0-9]+$/.test(text)) throw new Error(`${field} must be a whole number`);
  return Number(text);
}

async function saveTier(event) {
  event.preventDefault();
  const status = byId("tier-form-status");
  try {
    const name = byId("t-name").value.trim();
    const body = { requests: wholeNumber("t-requests", "requests"), period: wholeNumber("t-period", "window") };
    const tpm = wholeNumber("t-tpm", "tokens per minute", true);
    if (tpm !== null) body.tokens_per_minute = tpm;
    const saved = await api(`tiers/${encodeURIComponent(name)}`, { method: "PUT", body });
    say(status, `Saved tier ${saved.name}.`, "okay");
    tiers = (await api("tiers")).data;
    renderTiers();
    await loadTiers();
  } catch (err) {
    reportError(status, err);
  }
}

// ---------- model aliases ----------

let aliases = [];

async function loadAliases() {
  const status = byId("models-status");
  say(status, "Loading…");
  try {
    const view = await api("model-aliases");
    aliases = view.aliases.map((a) => ({ alias: a.alias, model: a.model, display_name: a.display_name ?? "" }));
    say(status, "");
    renderAliases(view.updated_at);
  } catch (err) {
    reportError(status, err);
  }
}

function aliasInput(index, field, label) {
  return el("input", {
    className: `alias-${field}`, value: aliases[index][field], "aria-label": `${label} ${index + 1}`, spellcheck: false,
    "data-index": index, "data-field": field,
  });
}

function renderAliases(updatedAt) {
  say(byId("models-status"), "");
  const rows = aliases.map((_, i) => [
    aliasInput(i, "alias", "Alias"),
    aliasInput(i, "model", "Model id"),
    aliasInput(i, "display_name", "Display name"),
    el("button", { type: "button", onclick: () => { readAliases(); aliases.splice(i, 1); renderAliases(); }, "aria-label": `Remove alias ${i + 1}` }, "Remove"),
  ]);
  fill(byId("models-body"),
    updatedAt ? el("p", { className: "muted" }, `Stored ${when(updatedAt)}.`) : null,
    table([{ label: "Alias", name: true }, { label: "Model id", name: true }, { label: "Display name", name: true }, { label: "" }], rows,
      "No alias: clients ask for model ids."));
}

/** The aliases as the inputs hold them now. */
function readAliases() {
  for (const input of byId("models-body").querySelectorAll("input[data-field]")) {
    aliases[Number(input.dataset.index)][input.dataset.field] = input.value;
  }
}

function addAlias() {
  readAliases();
  aliases.push({ alias: "", model: "", display_name: "" });
  renderAliases();
  const inputs = byId("models-body").querySelectorAll("input.alias-alias");
  inputs[inputs.length - 1].focus();
}

async function saveAliases() {
  const status = byId("models-status");
  readAliases();
  const body = {
    aliases: aliases.map((a) => {
      const entry = { alias: a.alias.trim(), model: a.model.trim() };
      if (a.display_name.trim()) entry.display_name = a.display_name.trim();
      return entry;
    }),
  };
  try {
    const view = await api("model-aliases", { method: "PUT", body });
    aliases = view.aliases.map((a) => ({ alias: a.alias, model: a.model, display_name: a.display_name ?? "" }));
    renderAliases(view.updated_at);
    say(status, `Saved ${view.aliases.length} ${view.aliases.length === 1 ? "alias" : "aliases"}.`, "okay");
  } catch (err) {
    reportError(status, err);
    // The refusal names its entry (`aliases[1].model`): point at it.
    const named = /aliases\[(\d+)\]\.(alias|model|display_name)/.exec(err.message);
    const input = named && byId("models-body").querySelector(`input[data-index="${named[1]}"][data-field="${named[2]}"]`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  }
}

function priceText(prices) {
  return `in ${prices.input} · out ${prices.output} · cache write ${prices.cache_write_5m} (5 m) / ${prices.cache_write_1h} (1 h) · cache read ${prices.cache_read}`;
}

async function loadPrices() {
  const status = byId("prices-status");
  say(status, "Loading…");
  try {
    const view = await api("prices");
    say(status, "");
    const rows = view.entries.map((e) => [e.model, when(e.effective_from), priceText(e.prices), e.bands && e.bands.length ? `${e.bands.length} band(s)` : ""]);
    fill(byId("prices-body"),
      el("p", { className: "muted" }, `Dollars per million tokens. Source: ${view.source}${view.updated_at ? `, updated ${when(view.updated_at)}` : ""}.`),
      table([{ label: "Model", name: true }, { label: "From" }, { label: "Prices" }, { label: "Bands" }], rows),
      el("h3", {}, "Models without a price"),
      el("p", {}, `${priceText(view.fallback)}`),
      el("p", { className: "muted" }, `UNPRICED_MODELS=${view.unpriced_models}: a model without a price is ${view.unpriced_models === "refuse" ? "refused" : "charged the prices above"}.`));
  } catch (err) {
    reportError(status, err);
  }
}

async function loadUpstreams() {
  const status = byId("upstreams-status");
  say(status, "Loading…");
  try {
    const view = await api("upstreams");
    say(status, "");
    const rows = view.upstreams.map((u) => [
      u.name, u.kind, `${u.priority} / ${u.weight}`,
      el("span", { className: `pill ${u.health.status === "healthy" ? "on" : "off"}` }, u.health.status),
      u.health.cooldown_until ? `${when(u.health.cooldown_until)} (${relative(u.health.cooldown_until)})` : "—",
      `${int(u.health.consecutive_failures)} in a row, ${int(u.health.failures)} in all`,
      u.health.last_failure ? `${u.health.last_failure.kind} ${relative(u.health.last_failure.at)}` : "—",
      `${int(u.today.requests)} / ${int(u.today.errors)} errors`,
      u.models.length ? u.models.join(", ") : "all",
    ]);
    fill(byId("upstreams-body"), table(
      [{ label: "Upstream", name: true }, { label: "Kind" }, { label: "Priority / weight" }, { label: "Health" }, { label: "Cooling down until" }, { label: "Failures" }, { label: "Last failure" }, { label: "Today" }, { label: "Models", name: true }],
      rows, "No upstream configured."));
  } catch (err) {
    reportError(status, err);
  }
}

// ---------- wiring ----------

byId("login-form").addEventListener("submit", signIn);
byId("sign-out").addEventListener("click", () => signOut("Signed out."));
document.querySelectorAll("#nav button").forEach((b) => b.addEventListener("click", () => openView(b.dataset.view)));
for (const id of ["key-search", "key-status", "key-tier", "key-near"]) byId(id).addEventListener("input", renderKeys);
byId("key-create").addEventListener("click", () => openKeyForm(null));
byId("key-refresh").addEventListener("click", loadKeys);
byId("key-form").addEventListener("submit", saveKey);
byId("key-cancel").addEventListener("click", () => byId("key-dialog").close());
byId("key-back").addEventListener("click", () => openView("keys"));
byId("usage-days").addEventListener("change", loadUsage);
byId("alias-add").addEventListener("click", addAlias);
byId("alias-save").addEventListener("click", saveAliases);
byId("tier-form").addEventListener("submit", saveTier);
byId("confirm-no").addEventListener("click", () => byId("confirm-dialog").close());
byId("secret-close").addEventListener("click", closeSecret);
byId("secret-dialog").addEventListener("cancel", () => { fill(byId("secret-value")); fill(byId("secret-env")); });
byId("secret-copy").addEventListener("click", async () => {
  const copied = await copyText(byId("secret-value").textContent, byId("secret-value"));
  byId("secret-copied").textContent = copied ? "Copied." : "Selected: press Ctrl-C (or ⌘-C) to copy.";
});
byId("secret-env-copy").addEventListener("click", async () => {
  const copied = await copyText(byId("secret-env").textContent, byId("secret-env"));
  byId("secret-copied").textContent = copied ? "Environment copied." : "Selected: press Ctrl-C (or ⌘-C) to copy.";
});
