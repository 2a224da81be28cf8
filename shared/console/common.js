// Helpers both consoles share: building elements (text only, never HTML),
// calling the relay's JSON APIs, and formatting numbers the APIs give.

/**
 * Creates an element. `props` sets properties (`className`, `type`,
 * `value`, `disabled`…) or, for `data-*`/`aria-*`/`for`, attributes;
 * children are nodes or strings (added as text, so never parsed as HTML).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name.startsWith("data-") || name.startsWith("aria-") || name === "for" || name === "scope") {
      node.setAttribute(name, String(value));
    } else if (name === "onclick") {
      node.addEventListener("click", value);
    } else {
      node[name] = value;
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function byId(id) {
  return document.getElementById(id);
}

export function show(node, visible = true) {
  node.classList.toggle("hidden", !visible);
}

/** An error an API answered, with Anthropic's envelope's message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Calls one of the relay's JSON APIs. `url` is absolute (built from the
 * script's own address, so a stage prefix stays); `headers` carry the
 * credential. Answers the parsed JSON, or throws `ApiError`.
 */
export async function callApi(url, { method = "GET", headers = {}, body } = {}) {
  const init = { method, headers: { accept: "application/json", ...headers }, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, `the relay could not be reached (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data && data.error && data.error.message ? data.error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return data;
}

const numberFormat = new Intl.NumberFormat("en-US");

export function int(n) {
  return n === null || n === undefined ? "—" : numberFormat.format(n);
}

/** Millionths of a dollar as dollars, e.g. 1234567 → "$1.23". */
export function usd(micro) {
  if (micro === null || micro === undefined) return "—";
  const dollars = micro / 1e6;
  // Cents hide the small amounts a single request costs.
  const size = Math.abs(dollars);
  const digits = size === 0 || size >= 1 ? 2 : size >= 0.01 ? 4 : 6;
  return (dollars < 0 ? "−$" : "$") + Math.abs(dollars).toFixed(digits);
}

/** A 0..1 ratio as a percentage. */
export function percent(ratio) {
  return ratio === null || ratio === undefined ? "—" : `${(ratio * 100).toFixed(1)} %`;
}

/** Large token counts kept short: 1.2 M, 35 k. */
export function compact(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(0)} k`;
  return numberFormat.format(n);
}

/** An RFC 3339 timestamp in the reader's locale, with how far away it is. */
export function when(timestamp) {
  if (!timestamp) return "—";
  const at = new Date(timestamp);
  if (Number.isNaN(at.getTime())) return String(timestamp);
  return at.toLocaleString();
}

export function relative(timestamp) {
  if (!timestamp) return "";
  const seconds = Math.round((new Date(timestamp).getTime() - Date.now()) / 1000);
  const format = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const abs = Math.abs(seconds);
  if (abs < 90) return format.format(seconds, "second");
  if (abs < 5400) return format.format(Math.round(seconds / 60), "minute");
  if (abs < 129600) return format.format(Math.round(seconds / 3600), "hour");
  return format.format(Math.round(seconds / 86400), "day");
}

/** A summary card: label, big value, optional note. */
export function card(label, value, note) {
  return el("div", { className: "card" },
    el("div", { className: "label" }, label),
    el("div", { className: "value" }, value),
    note ? el("div", { className: "note" }, note) : null);
}

/**
 * A table: `columns` are `{ label, num }`, `rows` arrays of cells (strings
 * or nodes). Phone width shows each row as a list, labelled by column.
 */
export function table(columns, rows, empty = "Nothing yet.") {
  if (rows.length === 0) return el("p", { className: "muted" }, empty);
  const head = el("tr", {}, columns.map((c) => el("th", { className: c.num ? "num" : "", scope: "col" }, c.label)));
  const body = rows.map((cells) =>
    el("tr", {}, cells.map((cell, i) =>
      el("td", { className: columns[i].num ? "num" : columns[i].name ? "name" : "", "data-label": columns[i].label }, cell))));
  return el("div", { className: "table-wrap" },
    el("table", { className: "responsive" }, el("thead", {}, head), el("tbody", {}, body)));
}

/** Copies text, through the Clipboard API where the page may use it. */
export async function copyText(text, fallbackNode) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Without clipboard permission: select the text so Ctrl-C copies it.
    if (fallbackNode) {
      const range = document.createRange();
      range.selectNodeContents(fallbackNode);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
    return false;
  }
}

/** Lines `export NAME=value` for a shell, from `[{name, value}]`. */
export function envLines(environment) {
  return environment.map((line) => `export ${line.name}=${shellQuote(line.value)}`).join("\n");
}

function shellQuote(value) {
  return /^[A-Za-z0-9_.:/@%+=,-]+$/.test(value) ? value : `'${value.replaceAll("'", "'\\''")}'`;
}

/** yyyy-mm-dd of a Date, in UTC (the usage APIs count days in UTC). */
export function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** The series name of what a day counted before it split by model. */
export const UNSPLIT = "(not split by model)";

/**
 * One series per model over daily rows (`…/usage/daily` or `/admin/usage`
 * `daily`), from each row's `by_model`: `field` is the counter stacked
 * (`cost_micro_usd`, `tokens`…). The models add up to the row; a day
 * settled before the split existed shows its remainder as `UNSPLIT`, so
 * every bar still totals the day. Largest series first, or in the order
 * of `order` (series names) so a model keeps its colour across charts.
 */
export function byModelSeries(rows, field, order = null) {
  const perModel = new Map();
  const rest = rows.map(() => 0);
  rows.forEach((row, i) => {
    let split = 0;
    for (const share of row.by_model || []) {
      if (!perModel.has(share.model)) perModel.set(share.model, rows.map(() => 0));
      perModel.get(share.model)[i] += share[field];
      split += share[field];
    }
    rest[i] = Math.max(0, row[field] - split);
  });
  const total = (values) => values.reduce((a, b) => a + b, 0);
  const rank = (name) => (order && order.includes(name) ? order.indexOf(name) : Infinity);
  const series = [...perModel].map(([name, values]) => ({ name, values }))
    .sort((a, b) => (order ? rank(a.name) - rank(b.name) : 0) || total(b.values) - total(a.values));
  if (total(rest) > 0) series.push({ name: UNSPLIT, values: rest });
  return { labels: rows.map((r) => r.date), series };
}

/** Request classes as the `…/usage/request-classes` answer lists them. */
const CLASS_NAMES = {
  main: "main conversation",
  subagent: "subagents",
  workflow: "workflows",
  compaction: "compaction",
  auxiliary: "auxiliary (titles, summaries…)",
  other: "other",
  unclassified: "unclassified (no class sent)",
};

/** The per-request-class table, from a `…/usage/request-classes` answer. */
export function requestClassTable(answer) {
  const rows = answer.data.map((c) => [
    CLASS_NAMES[c.request_class] ?? c.request_class,
    int(c.requests), compact(c.input_tokens), compact(c.output_tokens),
    compact(c.cache_creation_input_tokens), compact(c.cache_read_input_tokens), compact(c.tokens), usd(c.cost_micro_usd),
  ]);
  const columns = [
    { label: "Class", name: true }, { label: "Requests", num: true }, { label: "Input", num: true }, { label: "Output", num: true },
    { label: "Cache write", num: true }, { label: "Cache read", num: true }, { label: "Tokens", num: true }, { label: "Cost", num: true },
  ];
  return el("div", { id: "request-classes" },
    el("p", { className: "muted" }, `${answer.from} to ${answer.to} (UTC days), by the request class Claude Code sends.`),
    table(columns, rows, "No traffic in this period."));
}

/** The model a log row was served by, and the alias asked for if any. */
export function modelCell(row) {
  if (!row.model) return "—";
  if (!row.requested_model || row.requested_model === row.model) return row.model;
  return el("span", {}, row.model, el("span", { className: "muted alias" }, ` (asked as ${row.requested_model})`));
}
