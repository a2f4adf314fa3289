// Grad-CAM overlay controls on the case page: show/hide the overlay and set its opacity.
// Loaded as a file (the Content-Security-Policy allows no inline script); re-wired after htmx swaps.
function wireOverlays(root) {
  root.querySelectorAll("figure.image").forEach(function (figure) {
    var cam = figure.querySelector("img.cam");
    var toggle = figure.querySelector(".cam-toggle");
    var opacity = figure.querySelector(".cam-opacity");
    if (!cam || !toggle || !opacity || figure.dataset.wired) return;
    figure.dataset.wired = "1";
    function apply() {
      cam.hidden = !toggle.checked;
      cam.style.opacity = String(opacity.value / 100);
      opacity.disabled = !toggle.checked;
    }
    toggle.addEventListener("change", apply);
    opacity.addEventListener("input", apply);
    apply();
  });
}
document.addEventListener("DOMContentLoaded", function () { wireOverlays(document); });
document.addEventListener("htmx:afterSettle", function () { wireOverlays(document); });
