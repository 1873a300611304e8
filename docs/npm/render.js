// Typesets TeX with KaTeX at build time, for docs/hooks/math.py: one JSON request a
// line on stdin, {"tex": "...", "display": true}, one JSON answer a line on stdout,
// {"html": "..."} or {"error": "..."}. KaTeX is the one npm installed beside this
// script's copy in .cache/npm/ (its path is the first argument).
"use strict";
const katex = require(process.argv[2]);
const readline = require("readline");

const lines = readline.createInterface({ input: process.stdin, terminal: false });
lines.on("line", (line) => {
  const { tex, display } = JSON.parse(line);
  let answer;
  try {
    answer = {
      html: katex.renderToString(tex, {
        displayMode: display,
        throwOnError: true,
        output: "htmlAndMathml",
        strict: "ignore",
      }),
    };
  } catch (error) {
    answer = { error: String(error.message || error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
});
