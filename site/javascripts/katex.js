// Typeset the math of a page with KaTeX, which the site serves itself (see "How this
// site is made"). Markdown pages reach the browser with their math already delimited by
// Arithmatex, as \( ... \) and \[ ... \] (and \begin{align} ... \end{align}); the
// notebooks keep Jupyter's $ ... $ and $$ ... $$, which are read inside notebooks only,
// so that a dollar sign in prose elsewhere stays a dollar sign. Code is never typeset.
(function () {
  "use strict";

  var common = {
    throwOnError: false,
    ignoredClasses: ["literate-code", "highlight", "highlight-ipynb"],
  };

  function typeset(root) {
    renderMathInElement(root, Object.assign({}, common, {
      delimiters: [
        { left: "\\[", right: "\\]", display: true },
        { left: "\\(", right: "\\)", display: false },
        { left: "\\begin{equation}", right: "\\end{equation}", display: true },
        { left: "\\begin{align}", right: "\\end{align}", display: true },
        { left: "\\begin{align*}", right: "\\end{align*}", display: true },
        { left: "\\begin{gather}", right: "\\end{gather}", display: true },
      ],
    }));
    root.querySelectorAll(".jupyter-wrapper").forEach(function (notebook) {
      renderMathInElement(notebook, Object.assign({}, common, {
        delimiters: [
          { left: "$$", right: "$$", display: true },
          { left: "$", right: "$", display: false },
        ],
      }));
    });
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(function (doc) { typeset(doc.body || document.body); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  }
})();
