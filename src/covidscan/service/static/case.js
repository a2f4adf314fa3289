// The case page's verdict form and keys (the image viewer is viewer.js). Loaded as a file (the
// Content-Security-Policy allows no inline script); re-wired after htmx swaps.
//
// Draft: whatever the doctor types into the verdict form is kept in this browser (localStorage, per user
// and case) until the server has it, so a verdict typed into an expired session comes back after the login
// it is sent through. The server answers a saved verdict with ?saved=1; only then is the draft dropped.
var DRAFT_FIELDS = ["agree", "finding", "comment", "amendment_reason"];
// Where a key is text, not a command (a slider, box or radio button with focus leaves the keys working).
var TYPING = "textarea, select, input:not([type=range]):not([type=checkbox]):not([type=radio])";

function readForm(form) {
  var draft = {};
  DRAFT_FIELDS.forEach(function (name) {
    var fields = form.elements[name];
    if (!fields) return;
    if (fields instanceof RadioNodeList) {
      if (fields.value) draft[name] = fields.value;
    } else if (fields.value) {
      draft[name] = fields.value;
    }
  });
  var sign = form.elements.sign;
  if (sign && sign.type === "checkbox" && sign.checked) draft.sign = true;
  return draft;
}

function writeForm(form, draft) {
  DRAFT_FIELDS.forEach(function (name) {
    var fields = form.elements[name];
    if (fields && draft[name] !== undefined) fields.value = draft[name];
  });
  var sign = form.elements.sign;
  if (sign && sign.type === "checkbox") sign.checked = Boolean(draft.sign);
}

function wireDraft(form, key, saved) {
  if (saved) {
    localStorage.removeItem(key); // the server has the verdict: the draft has done its job
  } else {
    var stored = localStorage.getItem(key);
    if (stored) {
      try {
        writeForm(form, JSON.parse(stored));
        document.getElementById("draft-restored").hidden = false;
      } catch (e) {
        localStorage.removeItem(key); // unreadable: nothing worth restoring
      }
    }
  }
  function save() {
    localStorage.setItem(key, JSON.stringify(readForm(form)));
  }
  form.addEventListener("input", save);
  form.addEventListener("change", save);
}

// Agreeing with the model means its finding: choosing "agree" selects it (the server refuses an agreeing
// verdict with another finding, which would count as agreement while saying the opposite).
function agreeGivesTheModelsFinding(form) {
  var label = form.dataset.modelLabel;
  if (!label || !form.elements.finding) return;
  form.addEventListener("change", function (event) {
    if (event.target.name === "agree" && event.target.value === "yes" && event.target.checked) {
      form.elements.finding.value = label;
    }
  });
}

function caseKeys(event) {
  var root = document.getElementById("case");
  if (!root || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.matches && event.target.matches(TYPING)) return; // typing is typing
  var form = document.getElementById("verdict-form");
  var go = function (id) {
    if (id) window.location.assign("/cases/" + id);
  };
  var choose = function (value) {
    var radio = form && form.querySelector("input[name=agree][value=" + value + "]");
    if (!radio) return;
    radio.checked = true;
    radio.dispatchEvent(new Event("change", { bubbles: true }));
  };
  var sign = function () {
    if (!form) return;
    var box = form.elements.sign;
    if (box && box.type === "checkbox") box.checked = true;
    form.requestSubmit(); // the browser still checks the form: no signing without agree or disagree
  };
  var keys = {
    n: function () { go(root.dataset.nextCase); },
    p: function () { go(root.dataset.previousCase); },
    a: function () { choose("yes"); },
    d: function () { choose("no"); },
    S: sign,
  };
  var action = keys[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

function wireCase() {
  var root = document.getElementById("case");
  if (!root || root.dataset.wired) return;
  root.dataset.wired = "1";
  var url = new URL(window.location.href);
  var saved = url.searchParams.has("saved");
  if (saved) {
    url.searchParams.delete("saved");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  var form = document.getElementById("verdict-form");
  if (form) {
    wireDraft(form, root.dataset.draftKey, saved);
    agreeGivesTheModelsFinding(form);
  } else if (saved) {
    localStorage.removeItem(root.dataset.draftKey);
  }
}

document.addEventListener("DOMContentLoaded", wireCase);
document.addEventListener("htmx:afterSettle", wireCase);
document.addEventListener("keydown", caseKeys);
