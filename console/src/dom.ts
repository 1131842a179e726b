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
