// The parts of Cornerstone3D the case page uses, re-exported from one ES module (see build.sh).
export {
  init as initCore, RenderingEngine, getRenderingEngine, Enums, imageLoader, metaData, eventTarget, cache, utilities,
} from "@cornerstonejs/core";
export {
  init as initTools, addTool, ToolGroupManager, StackScrollTool, WindowLevelTool, ZoomTool, PanTool,
  Enums as ToolEnums,
} from "@cornerstonejs/tools";
export { init as initDicomImageLoader, wadouri } from "@cornerstonejs/dicom-image-loader";
export { metaData as typedMetaData } from "@cornerstonejs/metadata";
