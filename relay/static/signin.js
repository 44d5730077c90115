// The page a one-time sign-in link opens (/signin#<token>). The token lives in the URL
// fragment, which the browser never sends to a server; this script takes it out of the
// address bar and history at once, then trades it for a session cookie and goes to the
// dashboard. No inline script: the page's Content-Security-Policy allows only this file.
(function () {
  "use strict";

  var status = document.getElementById("signin-status");
  var failure = document.getElementById("signin-failure");
  var token = window.location.hash.replace(/^#/, "");
  if (window.location.hash) {
    // Replace, not push: going back must not bring the token back either.
    window.history.replaceState(null, "", window.location.pathname);
  }

  function fail(detail) {
    status.hidden = true;
    if (typeof detail === "string" && detail) {
      failure.textContent = detail;
    }
    failure.hidden = false;
  }

  // Only this relay's own dashboard: never follow an answer off this origin. Parse it as the
  // browser will (it strips tabs and newlines, reads a backslash as "/"), then compare origins.
  var DASHBOARD_PATH = /^\/(d\/[A-Za-z0-9._-]{1,64}\/)?dashboard\/$/;
  function safeTarget(next) {
    if (typeof next !== "string") {
      return "/";
    }
    var url;
    try {
      url = new URL(next, window.location.origin);
    } catch (error) {
      return "/";
    }
    if (url.origin !== window.location.origin || !DASHBOARD_PATH.test(url.pathname) ||
        url.search || url.hash) {
      return "/";
    }
    return url.pathname;
  }

  if (!token) {
    fail();
    return;
  }
  window.fetch("/api/v1/login-links/redeem", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: token }),
    credentials: "same-origin",
    cache: "no-store",
    redirect: "error"
  }).then(function (response) {
    return response.json().then(function (body) {
      if (response.ok && body) {
        window.location.replace(safeTarget(body.next));
      } else {
        // The page already words an expired or used link; other refusals say why.
        var gone = body && (body.error === "link_gone" || body.error === "bad_token");
        fail(gone ? null : body && body.detail);
      }
    }, function () {
      fail();
    });
  }, function () {
    fail("The relay could not be reached. Check the connection, then open the link again.");
  });
})();
