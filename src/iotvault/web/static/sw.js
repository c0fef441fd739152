/* iotvault service worker: caches the application shell only (styles, scripts, icons).
   Pages, device data, API answers and anything carrying a session are never cached:
   every request that is not a shell file goes to the network untouched. */
"use strict";
const CACHE = "iotvault-shell-v1";
const SHELL = [
  "/static/app.css",
  "/static/app.js",
  "/static/icons/icon.svg",
  "/static/icons/icon-192.png",
  "/static/icons/icon-512.png",
  "/static/vendor/uplot/uPlot.iife.min.js",
  "/static/vendor/uplot/uPlot.min.css",
];

self.addEventListener("install", function (event) {
  event.waitUntil(caches.open(CACHE).then(function (c) { return c.addAll(SHELL); }).catch(function () {}));
  self.skipWaiting();
});

self.addEventListener("activate", function (event) {
  event.waitUntil(caches.keys().then(function (keys) {
    return Promise.all(keys.filter(function (k) { return k !== CACHE; }).map(function (k) { return caches.delete(k); }));
  }));
});

// network first, so an upgraded server's shell is used at once; the cached copy only offline
self.addEventListener("fetch", function (event) {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin || SHELL.indexOf(url.pathname) < 0) return;
  event.respondWith(fetch(event.request).then(function (answer) {
    if (answer.ok) {
      const copy = answer.clone();
      caches.open(CACHE).then(function (c) { return c.put(event.request, copy); });
    }
    return answer;
  }).catch(function () { return caches.match(event.request); }));
});
