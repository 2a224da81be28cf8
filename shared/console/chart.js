// Charts as plain SVG, drawn from the API's numbers: stacked bars per day,
// horizontal bars per item, and a ratio meter. Colours come from classes
// (`s0`…`s7` in console.css), labels are text nodes, so nothing here is
// parsed as markup.

import { el } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const SERIES_CLASSES = 8;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seriesClass(index) {
  return `s${index % SERIES_CLASSES}`;
}

/** A round upper bound for an axis: 1, 2 or 5 times a power of ten. */
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function legend(series) {
  return el("ul", { className: "legend" },
    series.map((s, i) => el("li", { className: seriesClass(s.colour ?? i) }, el("span", {}, s.name))));
}

/**
 * Stacked bars, one per label (a day), one segment per series.
 * `series`: `[{ name, values: [number per label] }]`; `format` shows a
 * value; `namedSeries` shows the legend even for one series (models).
 * Each bar's `<title>` lists its segments (hover or screen reader); each
 * segment names its series and value in `data-series` / `data-value`.
 */
export function stackedBars({ title, labels, series, format, namedSeries = false }) {
  const width = 720;
  const height = 240;
  const left = 84;
  const bottom = 28;
  const top = 10;
  const plotWidth = width - left - 8;
  const plotHeight = height - top - bottom;
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotHeight * (1 - fraction);
    root.append(svg("line", { x1: left, x2: width - 8, y1: y, y2: y, class: fraction === 0 ? "axis" : "grid" }));
    root.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, format(max * fraction)));
  }
  const slot = plotWidth / Math.max(1, labels.length);
  const barWidth = Math.max(2, slot * 0.7);
  const every = Math.ceil(labels.length / 8);
  labels.forEach((label, i) => {
    const x = left + slot * i + (slot - barWidth) / 2;
    let y = top + plotHeight;
    const group = svg("g", { class: "bar", "data-label": label, "data-total": totals[i] });
    const lines = [`${label}: ${format(totals[i])}`];
    series.forEach((s, k) => {
      const value = s.values[i] || 0;
      if (value <= 0) return;
      const h = (value / max) * plotHeight;
      y -= h;
      group.append(svg("rect", { x, y, width: barWidth, height: Math.max(h, 0.5), class: seriesClass(k), "data-series": s.name, "data-value": value }));
      lines.push(`${s.name}: ${format(value)}`);
    });
    group.prepend(svg("title", {}, lines.join("\n")));
    root.append(group);
    if (i % every === 0) {
      root.append(svg("text", { x: x + barWidth / 2, y: height - 8, "text-anchor": "middle" }, label.slice(5)));
    }
  });
  return el("figure", { className: "chart-figure" }, root, series.length > 1 || namedSeries ? legend(series) : null);
}

/**
 * Horizontal bars: `rows` are `{ label, value }`, longest first as given;
 * `format` shows a value next to its bar.
 */
export function horizontalBars({ title, rows, format }) {
  const width = 720;
  const rowHeight = 26;
  const labelWidth = 260;
  const valueWidth = 110;
  const height = Math.max(1, rows.length) * rowHeight + 4;
  const max = Math.max(0, ...rows.map((r) => r.value)) || 1;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  rows.forEach((row, i) => {
    const y = 2 + i * rowHeight;
    const barSpace = width - labelWidth - valueWidth;
    const label = row.label.length > 34 ? `${row.label.slice(0, 33)}…` : row.label;
    root.append(svg("text", { x: 0, y: y + 17 }, label));
    root.append(svg("rect", { x: labelWidth, y: y + 5, width: barSpace, height: 14, class: "track" }));
    root.append(svg("rect", { x: labelWidth, y: y + 5, width: Math.max(1, (row.value / max) * barSpace), height: 14, class: seriesClass(i) },
      svg("title", {}, `${row.label}: ${format(row.value)}`)));
    root.append(svg("text", { x: width - 4, y: y + 17, "text-anchor": "end" }, format(row.value)));
  });
  return el("figure", { className: "chart-figure" }, root);
}

/**
 * How the prompt tokens split between fresh input, cache writes and cache
 * reads: a single stacked bar with its legend.
 */
export function cacheSplit(totals) {
  // The same colours as the tokens-per-day charts' series.
  const parts = [
    { name: "input (uncached)", value: totals.input_tokens, colour: 0 },
    { name: "cache writes", value: totals.cache_creation_input_tokens, colour: 2 },
    { name: "cache reads", value: totals.cache_read_input_tokens, colour: 3 },
  ];
  const sum = parts.reduce((a, p) => a + p.value, 0);
  const width = 720;
  const root = svg("svg", { viewBox: `0 0 ${width} 28`, class: "chart", role: "img", "aria-label": "prompt tokens by cache use" });
  let x = 0;
  parts.forEach((part) => {
    const w = sum > 0 ? (part.value / sum) * width : 0;
    root.append(svg("rect", { x, y: 4, width: w, height: 20, class: seriesClass(part.colour) },
      svg("title", {}, `${part.name}: ${part.value}`)));
    x += w;
  });
  if (sum === 0) root.append(svg("rect", { x: 0, y: 4, width, height: 20, class: "track" }));
  return el("figure", { className: "chart-figure" }, root, legend(parts));
}
