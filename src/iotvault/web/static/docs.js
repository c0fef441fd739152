/* /docs: Swagger UI on iotvault's own OpenAPI document, from the package's own assets. */
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  const el = document.getElementById("swagger-ui");
  if (typeof SwaggerUIBundle === "undefined") {
    el.textContent = "The API documentation library is not installed (make assets). The OpenAPI document is at /openapi.json.";
    return;
  }
  // "Try it out" from a signed-in browser goes through the session: changes need its CSRF token
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  SwaggerUIBundle({
    url: el.dataset.url, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    requestInterceptor: function (request) { if (csrf) request.headers["X-CSRF-Token"] = csrf; return request; },
  });
});
