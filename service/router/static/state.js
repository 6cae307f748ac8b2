// What several modules share: the image shown under "Compare and edit", the server's instance
// limit and the zoom. The list of images and the requests in flight belong to queue.js alone.

export const state = {
  selected: null, // the item in the viewer: {id, file, name, beforeUrl, status, result, boxes, ...}
  instanceLimit: 8, // the server's COLORIZE_INSTANCE_LIMIT, from /info
  zoom: 1, // screen pixels per output pixel
  fitOnLoad: true, // fit the next image shown to the viewer's width
};
