// The key holder's page: the holder pastes their key, and the page shows
// their own figures from the usage API (remaining budget, spend by day and
// model, cache efficiency, recent requests, the setup for Claude Code).
// The key lives in this module only (never in storage, a cookie or the
// URL); "Forget key" or reloading drops it.

import { el, fill, byId, show, callApi, int, usd, percent, compact, when, relative, card, table, copyText, envLines, byModelSeries, requestClassTable, modelCell } from "./common.js";
import { stackedBars, horizontalBars, cacheSplit } from "./chart.js";

// `…/api/usage/console/holder.js` → `…/api/usage`: the stage prefix stays.
const USAGE = new URL("../../usage", import.meta.url).href;

let key = null;

function usageApi(path) {
  return callApi(path ? `${USAGE}/${path}` : USAGE, { headers: { "x-api-key": key } });
}

function say(node, message, kind = "") {
  node.className = `status ${kind}`;
  node.textContent = message;
}

async function submit(event) {
  event.preventDefault();
  const input = byId("key-input");
  const status = byId("key-status");
  key = input.value.trim();
  input.value = "";
  say(status, "Loading…");
  try {
    await render();
    say(status, "");
    show(byId("view-key"), false);
    show(byId("view-usage"));
    show(byId("forget"));
  } catch (err) {
    key = null;
    say(status, err.message, "error");
  }
}

function forget() {
  key = null;
  fill(byId("usage-body"));
  show(byId("view-usage"), false);
  show(byId("forget"), false);
  show(byId("view-key"));
  say(byId("key-status"), "Key forgotten.");
  byId("key-input").focus();
}

function budgetCards(quota) {
  const cards = [];
  cards.push(card("Tokens used", `${int(quota.tokens_used)}${quota.token_limit ? ` / ${int(quota.token_limit)}` : ""}`,
    quota.token_limit ? `${int(quota.remaining)} left` : "no token limit"));
  for (const b of quota.budgets) {
    cards.push(card(`Dollars, ${b.window}${b.models ? ` (${b.models})` : ""}`, `${usd(b.remaining_micro_usd)} left`,
      `${usd(b.used_micro_usd)} of ${usd(b.limit_micro_usd)} used${b.resets_at ? ` · resets ${when(b.resets_at)} (${relative(b.resets_at)})` : ""}`));
  }
  const w = quota.rate_window;
  cards.push(card("Requests in this window", `${int(w.requests_remaining)} left`,
    `of ${int(quota.rate_limit_tier.requests)} per ${quota.rate_limit_tier.period} s${w.resets_at ? ` · resets ${relative(w.resets_at)}` : ""}`));
  if (quota.token_minute) {
    cards.push(card("Tokens this minute", `${int(quota.token_minute.tokens_remaining)} left`, `${int(quota.token_minute.tokens_used)} used`));
  }
  if (quota.expires_at) cards.push(card("Key expires", when(quota.expires_at), relative(quota.expires_at)));
  return el("div", { className: "cards" }, cards);
}

async function render() {
  const [summary, quota, daily, logs, setup, classes] = await Promise.all([
    usageApi(""), usageApi("quota"), usageApi("daily?days=30"), usageApi("logs?limit=25"), usageApi("setup"),
    usageApi("request-classes"),
  ]);
  byId("usage-title").textContent = `Usage of ${summary.name}`;
  say(byId("usage-status"), quota.is_active ? "" : "This key is disabled: the relay refuses it.", quota.is_active ? "" : "error");
  const spend = byModelSeries(daily.data, "cost_micro_usd");
  const tokens = byModelSeries(daily.data, "tokens", spend.series.map((s) => s.name));
  const modelRows = summary.by_model.map((m) => ({ label: m.model, value: m.cost_micro_usd }));
  const logRows = logs.data.map((r) => [
    when(r.at), modelCell(r),
    el("span", { className: `pill ${r.status < 400 ? "on" : "off"}` }, String(r.status)),
    int(r.input_tokens), int(r.output_tokens), int(r.cache_read_input_tokens), usd(r.cost_micro_usd), `${int(r.latency_ms)} ms`,
  ]);
  const envText = envLines(setup.environment);
  const envNode = el("code", { id: "setup-env" }, envText);
  const copied = el("span", { className: "status okay", role: "status" });
  fill(byId("usage-body"),
    el("h3", {}, "What is left"),
    budgetCards(quota),
    el("h3", {}, "All time"),
    el("div", { className: "cards" },
      card("Requests", int(summary.requests)),
      card("Tokens", compact(summary.tokens)),
      card("Spend", usd(summary.cost_micro_usd)),
      card("Cache hit ratio", percent(summary.cache_hit_ratio)),
      card("Saved by caching", usd(summary.cache_saved_micro_usd))),
    el("h3", {}, "Spend per day by model (30 days)"),
    el("div", { className: "spend-by-model" },
      stackedBars({ title: "spend per day by model", labels: spend.labels, series: spend.series, format: usd, namedSeries: true })),
    el("h3", {}, "Tokens per day by model (30 days)"),
    el("div", { className: "tokens-by-model" },
      stackedBars({ title: "tokens per day by model", labels: tokens.labels, series: tokens.series, format: compact, namedSeries: true })),
    el("h3", {}, "By request class (30 days)"),
    requestClassTable(classes),
    el("h3", {}, "Spend by model (all time)"),
    modelRows.length ? horizontalBars({ title: "spend by model", rows: modelRows, format: usd }) : el("p", { className: "muted" }, "No model used yet."),
    el("h3", {}, "Cache efficiency"),
    el("p", { className: "muted" }, `Prompt tokens read from the cache: ${percent(summary.cache_hit_ratio)}; caching saved ${usd(summary.cache_saved_micro_usd)}.`),
    cacheSplit(summary),
    el("h3", {}, "Recent requests"),
    table([{ label: "When" }, { label: "Model", name: true }, { label: "Status" }, { label: "Input", num: true }, { label: "Output", num: true }, { label: "Cache read", num: true }, { label: "Cost", num: true }, { label: "Latency", num: true }], logRows, "No request yet."),
    el("h3", {}, "Claude Code setup"),
    el("p", { className: "muted" }, "Set these before starting Claude Code; put your full key where the placeholder is."),
    el("pre", {}, envNode),
    el("div", { className: "actions" },
      el("button", { type: "button", id: "setup-copy", onclick: async () => {
        copied.textContent = (await copyText(envText, envNode)) ? "Copied." : "Selected: press Ctrl-C (or ⌘-C) to copy.";
      } }, "Copy setup"), copied),
    setup.warnings.length ? el("ul", { className: "error" }, setup.warnings.map((w) => el("li", {}, w))) : null);
}

byId("key-form").addEventListener("submit", submit);
byId("forget").addEventListener("click", forget);
