// The search index, fetched when the reader opens search, not with every page. The
// theme asks for search/search_index.json as soon as a page loads (over http; from
// file:// it loads search_index.js, which this leaves alone). This script, loaded before
// the theme's (mkdocs.yml, extra.polyfills), holds that one request until the search box
// gets the focus or the search overlay opens, then sends it.
(function () {
  "use strict";
  var open = XMLHttpRequest.prototype.open;
  var send = XMLHttpRequest.prototype.send;
  var waiting = [];
  var opened = false;

  function release() {
    if (opened) return;
    opened = true;
    waiting.splice(0).forEach(function (request) {
      send.apply(request.xhr, request.args);
    });
  }

  XMLHttpRequest.prototype.open = function (method, url) {
    this.__searchIndex = /search\/search_index\.json$/.test(String(url));
    return open.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function () {
    if (this.__searchIndex && !opened) {
      waiting.push({ xhr: this, args: arguments });
      return;
    }
    return send.apply(this, arguments);
  };

  document.addEventListener("focusin", function (event) {
    if (event.target.matches && event.target.matches(".md-search__input")) release();
  });
  document.addEventListener("change", function (event) {
    if (event.target.id === "__search" && event.target.checked) release();
  });
})();
