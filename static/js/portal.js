// The portal's few behaviours that need a browser: confirm destructive actions, copy snippets.
// Pages work without it (forms submit, snippets can be selected by hand).
document.addEventListener("submit", function (event) {
  var form = event.target, message = form.dataset && form.dataset.confirm;
  // data-confirm-when: ask only while the form matches it (e.g. "Active" unticked on a member).
  if (message && form.dataset.confirmWhen && !form.querySelector(form.dataset.confirmWhen)) return;
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
}, true);

document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) return;
  var source = document.getElementById(button.dataset.copy);
  navigator.clipboard.writeText(source.textContent).then(function () {
    var label = button.textContent;
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = label; }, 1500);
  });
});

// Every snippet gets a Copy button (the ones the page declares itself keep theirs).
document.querySelectorAll("pre.snippet[id]").forEach(function (pre) {
  if (document.querySelector('button[data-copy="' + pre.id + '"]')) return;
  var button = document.createElement("button");
  button.type = "button";
  button.className = "secondary copy";
  button.dataset.copy = pre.id;
  button.textContent = "Copy";
  pre.insertAdjacentElement("afterend", button);
});
