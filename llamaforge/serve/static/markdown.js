// A small Markdown renderer for model answers that builds DOM nodes directly. The text only ever becomes text
// nodes, so HTML in an answer (<script>, <img onerror>, ...) is shown as written and never runs; links are kept
// only for http(s) and mailto addresses, and images are shown as links (nothing is loaded from elsewhere).
// It covers what chat models write: headings, paragraphs and line breaks, **strong**, *emphasis*, ~~strike~~,
// `code`, fenced code blocks (with a copy button), lists (nested), block quotes, tables, rules and links. It
// renders unfinished input (an unclosed code fence while an answer streams) as well as it can.

import { copyButton, h } from "./dom.js";

const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
const TABLE_DELIMITER = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

/** Render `source` into a DocumentFragment. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(source).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

function indentOf(line) {
  return line.length - line.replace(/^ +/, "").length;
}

function isOrdered(marker) {
  return /\d/.test(marker);
}

function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    ITEM.test(line) ||
    isTableStart(lines, i)
  );
}

function isTableStart(lines, i) {
  return (
    i + 1 < lines.length && lines[i].includes("|") && lines[i + 1].includes("-") && TABLE_DELIMITER.test(lines[i + 1])
  );
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    let m;
    if ((m = line.match(FENCE))) {
      i = codeBlock(lines, i, m, parent);
    } else if ((m = line.match(HEADING))) {
      const heading = h(`h${m[1].length}`);
      inline(m[2] || "", heading);
      parent.append(heading);
      i++;
    } else if (RULE.test(line)) {
      parent.append(h("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      const quote = h("blockquote");
      renderBlocks(inner, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else if (isTableStart(lines, i)) {
      i = table(lines, i, parent);
    } else {
      const paragraph = [line.trim()];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) paragraph.push(lines[i++].trim());
      const p = h("p");
      inline(paragraph.join("\n"), p);
      parent.append(p);
    }
  }
}

function codeBlock(lines, i, open, parent) {
  const indent = open[1].length;
  const fence = open[2];
  const language = open[3];
  const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
  const code = [];
  i++;
  while (i < lines.length && !close.test(lines[i])) {
    code.push(lines[i].slice(Math.min(indent, indentOf(lines[i]))));
    i++;
  }
  const text = code.join("\n");
  parent.append(
    h(
      "div",
      { class: "code-block" },
      h(
        "div",
        { class: "code-head" },
        h("span", { class: "lang" }, language || "text"),
        copyButton(() => text),
      ),
      h("pre", {}, h("code", {}, text)),
    ),
  );
  return i + 1; // past the closing fence (or the end, for a block still streaming)
}

function list(lines, i, parent) {
  const first = lines[i].match(ITEM);
  const ordered = isOrdered(first[2]);
  const base = first[1].length;
  const el = h(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) el.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || isOrdered(m[2]) !== ordered || m[1].length < base || m[1].length > base + 3) break;
    const content = m[1].length + m[2].length + 1;
    const body = [m[3] || ""];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        let j = i;
        while (j < lines.length && !lines[j].trim()) j++;
        if (j < lines.length && indentOf(lines[j]) >= base + 2) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      const indent = indentOf(line);
      if (indent >= base + 2) {
        body.push(line.slice(Math.min(indent, content)));
      } else if (startsBlock(lines, i)) {
        break;
      } else {
        body.push(line.trim()); // a lazy continuation of the item's paragraph
      }
      i++;
    }
    const item = h("li");
    renderBlocks(body, item);
    // A tight item (no blank line inside) shows its text without paragraphs' margins.
    if (!body.includes("")) {
      for (const p of [...item.children]) if (p.nodeName === "P") p.replaceWith(...p.childNodes);
    }
    el.append(item);
    // Blank lines between items keep the list going when the next item follows.
    let j = i;
    while (j < lines.length && !lines[j].trim()) j++;
    const next = j < lines.length && lines[j].match(ITEM);
    if (j > i && next && isOrdered(next[2]) === ordered && next[1].length >= base && next[1].length <= base + 3) i = j;
  }
  parent.append(el);
  return i;
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, parent) {
  const header = cells(lines[i]);
  const align = cells(lines[i + 1]).map((d) =>
    d.startsWith(":") && d.endsWith(":") ? "center" : d.endsWith(":") ? "right" : d.startsWith(":") ? "left" : "",
  );
  const row = (values, tag) =>
    h(
      "tr",
      {},
      header.map((_, k) => {
        const cell = h(tag, align[k] ? { class: `align-${align[k]}` } : {});
        inline(values[k] ?? "", cell);
        return cell;
      }),
    );
  const body = h("tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) body.append(row(cells(lines[i++]), "td"));
  parent.append(h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, row(header, "th")), body)));
  return i;
}

// Inline spans: each rule is a regular expression; at every step the earliest match wins (ties: the first rule).
const INLINE = [
  { re: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, render: (m) => h("code", {}, m[2].replace(/^ (.*) $/s, "$1")) },
  { re: /\\([!-/:-@[-`{-~])/g, render: (m) => m[1] },
  { re: /<((?:https?:\/\/|mailto:)[^\s<>]+)>/g, render: (m) => link(m[1], m[1]) },
  {
    re: /!?\[([^\]\n]*)\]\(\s*<?([^\s<>()]*(?:\([^\s<>()]*\)[^\s<>()]*)*)>?(?:\s+["'][^"'\n]*["'])?\s*\)/g,
    render: (m) => link(m[2], m[1] || m[2], true),
  },
  { re: /\bhttps?:\/\/[^\s<>"]*[^\s<>"'.,;:!?)\]*_~]/g, render: (m) => link(m[0], m[0]) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*|\b__(?=\S)([\s\S]*?\S)__\b/g, render: (m) => inline(m[1] ?? m[2], h("strong")) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/g, render: (m) => inline(m[1], h("del")) },
  {
    re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|\b_(?=[^\s_])([\s\S]*?[^\s_])_\b/g,
    render: (m) => inline(m[1] ?? m[2], h("em")),
  },
  { re: /\n/g, render: () => h("br") },
];

function inline(text, parent) {
  const next = INLINE.map(() => null); // each rule's next match at or after `pos` (cached between steps)
  let pos = 0;
  while (pos < text.length) {
    let best = -1;
    for (let r = 0; r < INLINE.length; r++) {
      if (next[r] === undefined) continue; // this rule has no more matches
      if (next[r] === null || next[r].index < pos) {
        INLINE[r].re.lastIndex = pos;
        next[r] = INLINE[r].re.exec(text) ?? undefined;
        if (next[r] === undefined) continue;
      }
      if (best < 0 || next[r].index < next[best].index) best = r;
    }
    if (best < 0) break;
    const m = next[best];
    if (m.index > pos) parent.append(text.slice(pos, m.index));
    const node = INLINE[best].render(m);
    parent.append(node ?? m[0]);
    pos = m.index + m[0].length;
  }
  if (pos < text.length) parent.append(text.slice(pos));
  return parent;
}

function link(href, label, labelIsMarkdown = false) {
  if (!SAFE_URL.test(href)) return null; // javascript:, data:, relative: shown as the text that was written
  const a = h("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" });
  if (labelIsMarkdown) inline(label, a);
  else a.append(label);
  return a;
}
