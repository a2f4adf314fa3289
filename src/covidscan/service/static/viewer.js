// The case page's image viewer: Cornerstone3D (vendored, see static/VENDORED.md) shows the case's images as
// one stack. DICOM comes from its own bytes (pixel data, rescale to HU and the file's VOI) through the DICOM
// image loader; PNG, JPEG and BMP from the image itself, decoded by the browser. The Grad-CAM is an <img>
// laid over the viewport and kept on the image's corners as the camera zooms and pans.
// The viewer reports its state on #viewer-status and as data-* attributes of #viewer (tests read them).
import * as cs from "/static/vendor/cornerstone/cornerstone.js";

const VENDOR = "/static/vendor/cornerstone/";
const ENGINE_ID = "covidscan";
const VIEWPORT_ID = "case";
// CT windows in Hounsfield units: width and level, as radiologists name them.
const PRESETS = { lung: { width: 1500, level: -600 }, mediastinum: { width: 350, level: 50 } };
const ZOOM_STEP = 1.25;
// Where a key is text, not a command (a slider, box or radio button with focus leaves the keys working).
const TYPING = "textarea, select, input:not([type=range]):not([type=checkbox]):not([type=radio])";

let started = null; // the one-time Cornerstone set-up, shared by every viewer the page builds (htmx swaps)

function startCornerstone() {
  if (!started) {
    started = (async () => {
      await cs.initCore();
      // One worker is enough for a case; the codecs' WebAssembly comes from the vendored folder.
      cs.initDicomImageLoader({ maxWebWorkers: 1, wasmBasePath: VENDOR });
      cs.imageLoader.registerImageLoader("web", loadWebImage);
      cs.metaData.addProvider(webMetadata, 10000);
      cs.typedMetaData.addTypedProvider("imagePlaneModule", sanePlane, { priority: 10000 });
      cs.initTools();
      [cs.StackScrollTool, cs.WindowLevelTool, cs.ZoomTool, cs.PanTool].forEach((tool) => cs.addTool(tool));
    })();
  }
  return started;
}

// PNG, JPEG and BMP: an image loader for "web:<url>" ids. The browser decodes the file; it is shown gray
// (the model reads it gray too), with square 1-unit pixels and its own window 0–255.
const webSizes = new Map();

function loadWebImage(imageId) {
  const url = imageId.slice("web:".length);
  const promise = (async () => {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    const bitmap = await createImageBitmap(await response.blob());
    const { width, height } = bitmap;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(bitmap, 0, 0);
    const rgba = context.getImageData(0, 0, width, height).data;
    const gray = new Uint8Array(width * height);
    let min = 255;
    let max = 0;
    for (let i = 0; i < gray.length; i++) {
      const v = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
      gray[i] = v;
      min = Math.min(min, v);
      max = Math.max(max, v);
    }
    webSizes.set(imageId, { rows: height, columns: width });
    const voxelManager = cs.utilities.VoxelManager.createImageVoxelManager({
      width, height, numberOfComponents: 1, scalarData: gray, id: imageId,
    });
    return {
      imageId, rows: height, columns: width, height, width, color: false, rgba: false, numberOfComponents: 1,
      minPixelValue: min, maxPixelValue: max, slope: 1, intercept: 0, windowCenter: 128, windowWidth: 256,
      voiLUTFunction: "LINEAR", photometricInterpretation: "MONOCHROME2", invert: false,
      columnPixelSpacing: 1, rowPixelSpacing: 1, sizeInBytes: gray.byteLength, dataType: "Uint8Array",
      getPixelData: () => voxelManager.getScalarData(), getCanvas: () => canvas, voxelManager,
    };
  })();
  return { promise };
}

function webMetadata(type, imageId) {
  if (typeof imageId !== "string" || !imageId.startsWith("web:")) return undefined;
  const size = webSizes.get(imageId) || { rows: 0, columns: 0 };
  const modules = {
    imagePixelModule: {
      samplesPerPixel: 1, photometricInterpretation: "MONOCHROME2", bitsAllocated: 8, bitsStored: 8, highBit: 7,
      pixelRepresentation: 0, ...size,
    },
    imagePlaneModule: {
      ...size, frameOfReferenceUID: imageId, imageOrientationPatient: [1, 0, 0, 0, 1, 0], rowCosines: [1, 0, 0],
      columnCosines: [0, 1, 0], imagePositionPatient: [0, 0, 0], pixelSpacing: [1, 1], rowPixelSpacing: 1,
      columnPixelSpacing: 1,
    },
    generalSeriesModule: { modality: "OT" },
    modalityLutModule: { rescaleSlope: 1, rescaleIntercept: 0 },
    voiLutModule: { windowCenter: [128], windowWidth: [256] },
  };
  return modules[type];
}

// A DICOM's plane module, with pixel spacing 1 × 1 where the file's is missing, zero or not a number: real
// files carry "0.000\\0.000" (a CR image here did), and a zero spacing leaves the camera at NaN (black).
// A typed provider in front of the library's own: it gets the library's answer from `next`.
function sanePlane(next, query, data, options) {
  const plane = next(query, data, options);
  const ok = (v) => Number.isFinite(v) && v > 0;
  if (!plane || (ok(plane.rowPixelSpacing) && ok(plane.columnPixelSpacing))) return plane;
  return { ...plane, rowPixelSpacing: 1, columnPixelSpacing: 1, pixelSpacing: [1, 1] };
}

// Window width/level <-> the VOI range Cornerstone keeps, by the DICOM standard's linear function (the one
// Cornerstone reads a file's Window Center/Width with), so a file's W400/L40 reads back as W400/L40.
function windowOf(range) {
  const w = cs.utilities.windowLevel.toWindowLevel(range.lower, range.upper);
  return { width: w.windowWidth, level: w.windowCenter };
}

class CaseViewer {
  constructor(root) {
    this.root = root;
    this.element = root.querySelector("#viewport");
    this.status = root.querySelector("#viewer-status");
    this.camImage = root.querySelector("#cam-overlay");
    this.camToggle = root.querySelector("#cam-toggle");
    this.camOpacity = root.querySelector("#cam-opacity");
    this.items = [...root.querySelectorAll(".image-item")];
  }

  async start() {
    await startCornerstone();
    const ids = this.items.map((item) => this.imageIdOf(item));
    this.imageIds = ids;
    // One engine per page: an htmx swap or a second start replaces the previous one.
    cs.getRenderingEngine?.(ENGINE_ID)?.destroy();
    this.engine = new cs.RenderingEngine(ENGINE_ID);
    this.engine.enableElement({
      viewportId: VIEWPORT_ID,
      type: cs.Enums.ViewportType.STACK,
      element: this.element,
      defaultOptions: { background: [0, 0, 0] },
    });
    this.viewport = this.engine.getViewport(VIEWPORT_ID);
    this.setUpTools();
    const events = cs.Enums.Events;
    [events.STACK_NEW_IMAGE, events.VOI_MODIFIED, events.CAMERA_MODIFIED, events.IMAGE_RENDERED].forEach((e) =>
      this.element.addEventListener(e, () => this.update()),
    );
    window.addEventListener("resize", () => {
      this.engine.resize(true, true);
      this.update();
    });
    this.wireControls();
    await this.viewport.setStack(ids, 0);
    this.showOwnWindow();
    this.root.dataset.ready = "1";
    this.update();
  }

  imageIdOf(item) {
    const url = new URL(item.dataset.src, window.location.href).href;
    return `${item.dataset.format === "dicom" ? "wadouri" : "web"}:${url}`;
  }

  setUpTools() {
    const toolGroupId = `${ENGINE_ID}-tools`;
    cs.ToolGroupManager.destroyToolGroup(toolGroupId);
    const group = cs.ToolGroupManager.createToolGroup(toolGroupId);
    const buttons = cs.ToolEnums.MouseBindings;
    const bindings = [
      [cs.WindowLevelTool, buttons.Primary],
      [cs.ZoomTool, buttons.Secondary],
      [cs.PanTool, buttons.Auxiliary],
      [cs.StackScrollTool, buttons.Wheel],
    ];
    bindings.forEach(([tool]) => group.addTool(tool.toolName));
    bindings.forEach(([tool, button]) => group.setToolActive(tool.toolName, { bindings: [{ mouseButton: button }] }));
    group.addViewport(VIEWPORT_ID, ENGINE_ID);
    this.element.addEventListener("contextmenu", (e) => e.preventDefault()); // right-drag zooms
  }

  wireControls() {
    this.root.querySelectorAll("[data-preset]").forEach((b) => b.addEventListener("click", () => this.preset(b.dataset.preset)));
    const actions = { "zoom-in": () => this.zoom(ZOOM_STEP), "zoom-out": () => this.zoom(1 / ZOOM_STEP), reset: () => this.reset() };
    this.root.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", actions[b.dataset.action]));
    this.items.forEach((item, i) => item.querySelector(".jump").addEventListener("click", () => this.go(i)));
    if (this.camToggle) {
      this.camToggle.addEventListener("change", () => this.update());
      this.camOpacity.addEventListener("input", () => this.update());
    }
    document.addEventListener("keydown", (e) => this.key(e));
  }

  key(event) {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || !this.viewport) return;
    if (target.matches && target.matches(TYPING)) return; // typing is typing
    const keys = {
      ArrowDown: () => this.go(this.index() + 1), j: () => this.go(this.index() + 1), PageDown: () => this.go(this.index() + 1),
      ArrowUp: () => this.go(this.index() - 1), k: () => this.go(this.index() - 1), PageUp: () => this.go(this.index() - 1),
      Home: () => this.go(0), End: () => this.go(this.imageIds.length - 1),
      1: () => this.preset("lung"), 2: () => this.preset("mediastinum"), 0: () => this.preset("image"),
      "+": () => this.zoom(ZOOM_STEP), "=": () => this.zoom(ZOOM_STEP), "-": () => this.zoom(1 / ZOOM_STEP),
      r: () => this.reset(), o: () => this.toggleOverlay(),
    };
    const action = keys[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  }

  index() {
    return this.viewport.getCurrentImageIdIndex();
  }

  go(i) {
    const to = Math.max(0, Math.min(this.imageIds.length - 1, i));
    if (to !== this.index()) this.viewport.setImageIdIndex(to);
  }

  isCT() {
    const series = cs.metaData.get("generalSeriesModule", this.imageIds[this.index()]);
    return Boolean(series && series.modality === "CT");
  }

  preset(name) {
    if (name === "image") return this.showOwnWindow();
    const { width, level } = PRESETS[name];
    this.viewport.setProperties({ voiRange: cs.utilities.windowLevel.toLowHighRange(width, level) });
    this.viewport.render();
  }

  // The image's own window: a DICOM's VOI (Window Center / Width) as the loader read it, a PNG's 0–255
  // (W256/L128, from webMetadata).
  showOwnWindow() {
    this.viewport.resetProperties();
    this.viewport.render();
  }

  zoom(factor) {
    this.viewport.setZoom(this.viewport.getZoom() * factor);
    this.viewport.render();
  }

  reset() {
    this.viewport.resetCamera();
    this.showOwnWindow();
  }

  toggleOverlay() {
    if (!this.camToggle) return;
    this.camToggle.checked = !this.camToggle.checked;
    this.update();
  }

  // Lays the Grad-CAM over the image's rectangle on the canvas, wherever zoom and pan put it.
  placeOverlay(item) {
    const on = Boolean(this.camToggle && this.camToggle.checked && item.dataset.cam);
    this.camImage.hidden = !on;
    this.root.dataset.overlay = on ? "on" : "off";
    if (!on) return;
    if (this.camImage.dataset.src !== item.dataset.cam) {
      this.camImage.src = item.dataset.cam;
      this.camImage.dataset.src = item.dataset.cam;
    }
    const image = cs.cache.getImage(this.imageIds[this.index()]);
    if (!image) return;
    const world = (x, y) => cs.utilities.imageToWorldCoords(image.imageId, [x, y]);
    const [x0, y0] = this.viewport.worldToCanvas(world(0, 0));
    const [x1, y1] = this.viewport.worldToCanvas(world(image.columns, image.rows));
    const style = this.camImage.style;
    style.left = `${Math.min(x0, x1)}px`;
    style.top = `${Math.min(y0, y1)}px`;
    style.width = `${Math.abs(x1 - x0)}px`;
    style.height = `${Math.abs(y1 - y0)}px`;
    style.opacity = String(this.camOpacity.value / 100);
  }

  update() {
    if (!this.viewport || !this.imageIds) return;
    const i = this.index();
    const item = this.items[i];
    this.items.forEach((it, k) => it.classList.toggle("current", k === i));
    const range = this.viewport.getProperties().voiRange;
    const zoom = this.viewport.getZoom();
    const ct = this.isCT();
    this.root.querySelectorAll("[data-preset=lung], [data-preset=mediastinum]").forEach((b) => {
      b.disabled = !ct; // Hounsfield windows mean nothing on a PNG's gray levels
    });
    const d = this.root.dataset;
    d.index = String(i);
    d.count = String(this.imageIds.length);
    d.zoom = zoom.toFixed(3);
    if (range) {
      const { width, level } = windowOf(range);
      d.windowWidth = width.toFixed(1);
      d.windowLevel = level.toFixed(1);
    }
    const windowText = range ? `W ${Math.round(Number(d.windowWidth))} / L ${Math.round(Number(d.windowLevel))}${ct ? " HU" : ""}` : "";
    this.status.textContent = `Image ${i + 1} of ${this.imageIds.length} · ${windowText} · zoom ${zoom.toFixed(2)}×`;
    if (item) this.placeOverlay(item);
  }
}

function failed(root, error) {
  const message = root.querySelector("#viewer-message");
  message.textContent = `The viewer could not show these images (${error.message || error}). The originals can be downloaded below.`;
  message.hidden = false;
  root.dataset.ready = "error";
  console.error(error);
}

function wireViewer() {
  const root = document.getElementById("viewer");
  if (!root || root.dataset.wired || !root.querySelector(".image-item")) return;
  root.dataset.wired = "1";
  new CaseViewer(root).start().catch((e) => failed(root, e));
}

wireViewer();
document.addEventListener("htmx:afterSettle", wireViewer);
