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

// Form fields that only one choice uses (data-shown-when="select_name=value1,value2") are shown
// while that choice is made; a field with an error stays in view.
function showChosenFields(form) {
  form.querySelectorAll("[data-shown-when]").forEach(function (input) {
    var rule = input.dataset.shownWhen.split("="), chosen = form.elements[rule[0]];
    var block = input.closest(".field") || input.parentElement;
    var wanted = !chosen || rule[1].split(",").indexOf(chosen.value) !== -1 || block.querySelector(".errorlist");
    block.hidden = !wanted;
  });
}
document.querySelectorAll("form").forEach(function (form) {
  if (!form.querySelector("[data-shown-when]")) return;
  showChosenFields(form);
  form.addEventListener("change", function () { showChosenFields(form); });
});
