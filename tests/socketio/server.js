// One Socket.IO server instance for tests/socketio.rs.
//
//   node server.js NAME [PORT]
//
// Listens on 127.0.0.1:PORT (0, the default, picks a free port) and prints
// `listening PORT` on stdout once it accepts connections. Every ack names
// this instance and the transport the event arrived over, so a client can
// tell which instance served each phase of its session. On stderr, one JSON
// line per engine.io connection error (`{"event":"connection_error",...}`):
// a request whose session lives on another instance shows up here as
// "Session ID unknown".
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const [name, portArg = "0"] = process.argv.slice(2);
if (!name) {
  console.error("usage: node server.js NAME [PORT]");
  process.exit(2);
}
const port = Number(portArg);

const httpServer = http.createServer();
const io = new Server(httpServer, {
  // As a typical deployment does: any page may talk to the service, the
  // backend echoes its Origin in Access-Control-Allow-Origin. wsgate's
  // `origins` (and `origin_checks`) is what stands in front of it.
  cors: { origin: true, credentials: true },
});

function log(event, fields) {
  process.stderr.write(JSON.stringify({ event, instance: name, ...fields }) + "\n");
}

io.engine.on("connection_error", (err) => {
  log("connection_error", {
    code: err.code,
    message: err.message,
    url: err.req && err.req.url,
  });
});

io.on("connection", (socket) => {
  // The transport history of this session as this instance saw it:
  // `polling` at the handshake, then `websocket` once the upgrade lands.
  const transports = [socket.conn.transport.name];
  socket.conn.on("upgrade", (transport) => {
    transports.push(transport.name);
    socket.emit("upgraded", { instance: name, transports: transports.slice() });
  });
  socket.emit("hello", { instance: name, transport: socket.conn.transport.name });

  socket.on("echo", (payload, ack) => {
    if (typeof ack !== "function") {
      return;
    }
    ack({
      instance: name,
      transport: socket.conn.transport.name,
      transports: transports.slice(),
      payload,
    });
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  process.stdout.write(`listening ${httpServer.address().port}\n`);
});

// The test ends this process by closing its stdin (and kills it if that
// fails), so a crashed test leaves no server behind.
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
