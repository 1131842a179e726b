// A few DOM helpers. Every text from the server goes in as text (textContent), never as HTML.

type Child = Node | string | null | undefined | false;
type Attributes = Record<string, string | boolean | ((event: Event) => void)>;

/** An element with attributes (`on…` functions become listeners) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Attributes = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else if (value !== false) {
      element.setAttribute(name, value);
    }
  }
  append(element, ...children);
  return element;
}

export function append(parent: Node, ...children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
}

/** Replaces the children of `parent`. */
export function show(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, ...children);
}

/** A labelled input; the label's text names it for people and for tests alike. */
export function field(
  label: string,
  attributes: Attributes = {},
): { row: HTMLLabelElement; input: HTMLInputElement } {
  const input = h("input", attributes);
  return { row: h("label", { class: "field" }, h("span", {}, label), input), input };
}

/** A form whose submit runs `onSubmit` (the page never navigates). */
export function form(onSubmit: () => void | Promise<void>, ...children: Child[]): HTMLFormElement {
  return h(
    "form",
    {
      onsubmit: (event: Event) => {
        event.preventDefault();
        void onSubmit();
      },
    },
    ...children,
  );
}

/** Moves focus to `element` (made focusable by script only, when it is not already). */
export function focusOn(element: HTMLElement): void {
  if (!element.hasAttribute("tabindex") && element.tabIndex < 0) element.tabIndex = -1;
  element.focus();
}

/** One tab of a tab list: its title and its panel's content. */
export interface Tab {
  id: string;
  title: string;
  panel: HTMLElement;
}

/**
 * Tabs as the WAI-ARIA Authoring Practices' tabs pattern: a tablist of tab buttons, one
 * tabpanel each. Tab reaches the selected tab only; the arrow keys, Home and End move between
 * tabs and select them; Tab again goes into the panel.
 */
export function tabs(label: string, all: Tab[]): HTMLElement {
  const list = h("div", { role: "tablist", "aria-label": label });
  const buttons: HTMLButtonElement[] = [];
  const panels: HTMLElement[] = [];
  const select = (index: number, focus: boolean) => {
    buttons.forEach((button, i) => {
      const selected = i === index;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      panels[i]!.hidden = !selected;
    });
    if (focus) buttons[index]!.focus();
  };
  all.forEach((tab, index) => {
    const button = h(
      "button",
      {
        type: "button",
        role: "tab",
        id: `tab-${tab.id}`,
        "aria-controls": `panel-${tab.id}`,
        onclick: () => select(index, false),
      },
      tab.title,
    );
    const panel = tab.panel;
    panel.id = `panel-${tab.id}`;
    panel.setAttribute("role", "tabpanel");
    panel.setAttribute("aria-labelledby", button.id);
    panel.tabIndex = 0;
    buttons.push(button);
    panels.push(panel);
    list.append(button);
  });
  list.addEventListener("keydown", (event: KeyboardEvent) => {
    const current = buttons.indexOf(document.activeElement as HTMLButtonElement);
    if (current < 0) return;
    const last = buttons.length - 1;
    const to = {
      ArrowRight: current === last ? 0 : current + 1,
      ArrowLeft: current === 0 ? last : current - 1,
      Home: 0,
      End: last,
    }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    select(to, true);
  });
  select(0, false);
  return h("div", { class: "tabs" }, list, ...panels);
}
