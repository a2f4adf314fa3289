// Node built-ins in the bundle: the packages require them (some at load time) only for Node code paths,
// never taken in a browser. xmlbuilder2's streaming builder (unused here) extends EventEmitter on load.
class EventEmitter {}
module.exports = { EventEmitter };
