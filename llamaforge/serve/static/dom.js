// Building DOM nodes. Strings only ever become text nodes (append / textContent): no code in this page parses
// HTML, so nothing a model or a server says can become markup, a script or an event handler.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) {
      if (typeof value === "function") el.addEventListener(key.slice(2), value); // never an inline handler
    } else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child != null && child !== false) el.append(child);
  }
  return el;
}

// Icons drawn as SVG elements from fixed path data (24x24 grid, stroked with the text colour).
const ICONS = {
  plus: ["M12 5v14", "M5 12h14"],
  send: ["M5 12h14", "M13 6l6 6-6 6"],
  stop: [{ rect: [7, 7, 10, 10] }],
  menu: ["M4 6h16", "M4 12h16", "M4 18h16"],
  settings: ["M4 7h9", "M17 7h3", "M4 17h3", "M11 17h9", { circle: [15, 7, 2] }, { circle: [9, 17, 2] }],
  pencil: ["M4 20h4L19 9l-4-4L4 16z", "M13 7l4 4"],
  trash: ["M5 7h14", "M10 7V4h4v3", "M7 7l1 13h8l1-13"],
  copy: [{ rect: [9, 9, 11, 11] }, "M5 15V5a1 1 0 0 1 1-1h9"],
  image: [{ rect: [3, 5, 18, 14] }, "M3 16l5-5 4 4 3-3 6 6", { circle: [8.5, 9.5, 1.5] }],
  theme: [{ circle: [12, 12, 8] }, "M12 4v16"],
  close: ["M6 6l12 12", "M18 6L6 18"],
  retry: ["M4 12a8 8 0 1 0 2.3-5.7", "M4 4v4h4"],
};

const SVG = "http://www.w3.org/2000/svg";

export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.classList.add("icon");
  for (const part of ICONS[name]) {
    let node;
    if (typeof part === "string") {
      node = document.createElementNS(SVG, "path");
      node.setAttribute("d", part);
    } else if (part.rect) {
      node = document.createElementNS(SVG, "rect");
      const [x, y, width, height] = part.rect;
      for (const [k, v] of Object.entries({ x, y, width, height, rx: 1.5 })) node.setAttribute(k, v);
    } else {
      node = document.createElementNS(SVG, "circle");
      const [cx, cy, r] = part.circle;
      for (const [k, v] of Object.entries({ cx, cy, r })) node.setAttribute(k, v);
    }
    svg.append(node);
  }
  return svg;
}

// navigator.clipboard exists only in secure contexts (https, localhost); a page served on a LAN address over plain
// http falls back to the older copy command on a hidden text field.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // permission refused: try the fallback
    }
  }
  const area = h("textarea", { class: "offscreen", readOnly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

export function copyButton(getText, label = "Copy") {
  const text = h("span", {}, label);
  const button = h("button", { type: "button", class: "copy", title: "Copy to the clipboard" }, icon("copy"), text);
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    text.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (text.textContent = label), 1500);
  });
  return button;
}
