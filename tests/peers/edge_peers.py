#!/usr/bin/env python3
"""Backends and clients for the edge's end-to-end tests and benchmarks.

Backends run inside VM namespaces; clients run where the edge's listeners are.

  edge_peers.py http PORT            HTTP/1.1 backend (see Http below)
  edge_peers.py ws PORT              WebSocket echo backend
  edge_peers.py grpc PORT            gRPC backend, generic handlers (no protoc needed)
  edge_peers.py h2-early PORT        h2c backend that answers before the whole request
  edge_peers.py ws-client URL ADDR PORT      checks echo of small, large and fragmented messages
  edge_peers.py grpc-client ADDR AUTHORITY   runs every gRPC case, prints one JSON object
  edge_peers.py grpc-together ADDR AUTHORITY N   N calls at once: the VM connections they came on
  edge_peers.py stalled-client MODE METHOD ADDR PORT AUTHORITY PATH WAIT
                                     asks, then stops reading for WAIT s (see stalled_client)
  edge_peers.py upload ADDR PORT AUTHORITY PATH BYTES     an h2c POST sent as fast as it is taken
  edge_peers.py stalled-upload ADDR PORT AUTHORITY PATH   one whose body stops at 10 of 1000 bytes

Clients print what they saw as JSON on stdout and exit 0; the Rust test decides.
"""

import asyncio
import hashlib
import http.server
import json
import socket
import socketserver
import sys
import threading
import time


def pattern(n):
    """n deterministic bytes."""
    block = bytes(range(251)) * 262
    out = bytearray()
    while len(out) < n:
        out += block[: n - len(out)]
    return bytes(out)


class Http(http.server.BaseHTTPRequestHandler):
    """GET /hello, /headers (request headers as JSON), /download?n=N (x-sha256 header),
    /sse (one event, then waits for GET /release, then a second), /slow (sleeps 5 s),
    /chunked (chunks with an extension and a trailer), /until-close (an HTTP/1.0 answer
    that ends when the connection does), /empty (204), /early (103 then 200),
    /close-after (answers, then closes the connection without saying so), /drop-next
    (answers; the next request on the same connection is read and left unanswered, the
    connection closed); HEAD of any GET; POST /upload (answers bytes and sha256 of the
    body, chunked or not); POST /reject[?open=S] (413 before reading the body, then
    closes, as a server with a size limit does; after S seconds); POST /echo (the body
    back, chunked, as it is read); POST /download?n=N (the body read, then as GET)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    release = threading.Event()

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.head = True
        try:
            self.do_GET()
        finally:
            self.head = False

    def reply_or_head(self, status, body):
        if getattr(self, "head", False):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
        else:
            self.reply(status, body)

    def dropped(self):
        """The request is left unanswered and the connection closed, once armed."""
        if getattr(self, "drop_next", False):
            self.close_connection = True
            return True
        return False

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if self.dropped():
            return
        if getattr(self, "head", False):
            self.reply_or_head(200, f"hello from {self.server.server_address[1]}\n".encode())
        elif path == "/hello":
            port = self.server.server_address[1]
            self.reply(200, f"hello from {port}\n".encode())
        elif path == "/headers":
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.reply(200, json.dumps(headers).encode(), "application/json")
        elif path == "/download":
            self.download(int(query.split("=", 1)[1]))
        elif path == "/sse":
            Http.release.clear()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"data: one\n\n")
            Http.release.wait(30)
            self.chunk(b"data: two\n\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/release":
            Http.release.set()
            self.reply(200, b"released\n")
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "x-end")
            self.end_headers()
            self.wfile.write(b"6;name=value\r\nfirst \r\n")
            self.wfile.flush()
            self.wfile.write(b"7\r\nsecond \r\n5\r\nthird\r\n0\r\nx-end: yes\r\n\r\n")
        elif path == "/until-close":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            self.wfile.write(pattern(100000))
            self.close_connection = True
        elif path == "/empty":
            self.send_response(204)
            self.end_headers()
        elif path == "/early":
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            self.wfile.flush()
            self.reply(200, b"after the hints\n")
        elif path == "/close-after":
            self.reply(200, b"closing\n")
            self.close_connection = True
        elif path == "/drop-next":
            self.reply(200, b"armed\n")
            self.drop_next = True
        elif path == "/slow":
            time.sleep(5)
            self.reply(200, b"late\n")
        else:
            self.reply(404, b"backend: not found\n")

    def download(self, n):
        body = pattern(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.send_header("x-sha256", hashlib.sha256(body).hexdigest())
        self.end_headers()
        view = memoryview(body)
        for i in range(0, n, 65536):
            self.wfile.write(view[i : i + 65536])

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        if self.dropped():
            return
        path, _, query = self.path.partition("?")
        if path == "/reject":
            self.close_connection = True
            self.reply(413, b"too large\n", extra=[("Connection", "close")])
            # ?open=S: the connection is left open, its body unread, for S seconds.
            self.wfile.flush()
            time.sleep(float(query.removeprefix("open=") or "0"))
            return
        if path == "/download":
            # The body read, then GET /download's answer.
            self.read_body()
            self.download(int(query.split("=", 1)[1]))
            return
        if path == "/echo":
            # The body back as it is read: the answer needs the body to keep coming.
            left = int(self.headers.get("Content-Length", "0"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    break
                self.chunk(data)
                left -= len(data)
            self.wfile.write(b"0\r\n\r\n")
            return
        n, digest = self.read_body()
        body = json.dumps({"bytes": n, "sha256": digest.hexdigest()}).encode()
        self.reply(200, body, "application/json")

    def read_body(self):
        """The request's body, chunked or not, read: its length and sha256."""
        digest, n = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower().endswith("chunked"):
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    digest.update(data)
                    n += len(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    break
                digest.update(data)
                n += len(data)
                left -= len(data)
        return n, digest


class Server6(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def serve_http(port):
    Server6(("::", port), Http).serve_forever()


async def serve_ws(port):
    from websockets.asyncio.server import serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "::", port, max_size=16 * 1024 * 1024):
        await asyncio.Future()


async def ws_client(url, addr, port):
    from websockets.asyncio.client import connect

    seen = {}
    async with connect(url, host=addr, port=port, max_size=16 * 1024 * 1024) as ws:
        await ws.send("hello")
        seen["text"] = await ws.recv() == "hello"
        big = pattern(4 * 1024 * 1024)
        await ws.send(big)
        seen["large"] = await ws.recv() == big
        parts = [pattern(70000)[i : i + 7000] for i in range(0, 70000, 7000)]
        await ws.send(parts)  # one message in ten frames
        seen["fragmented"] = await ws.recv() == b"".join(parts)
        pong = await ws.ping()
        await asyncio.wait_for(pong, 5)
        seen["ping"] = True
    print(json.dumps(seen))


SERVICE = "vmedge.test.Echo"


def identity(b):
    return b


def serve_grpc(port):
    import grpc
    from concurrent import futures

    def unary(req, ctx):
        ctx.set_trailing_metadata((("x-served-by", "backend"),))
        return req

    def server_stream(req, ctx):
        for i in range(5):
            yield req + str(i).encode()

    def client_stream(it, ctx):
        return b"|".join(it)

    def bidi(it, ctx):
        for m in it:
            yield m.upper()

    def fail(req, ctx):
        ctx.set_trailing_metadata((("x-detail", "why-not"),))
        ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "not today")

    # Calls of Slow that saw their client's cancel or deadline (a cancel reaches the
    # server only as a reset of the stream, which every hop must pass on).
    cancelled = [0]

    def slow(req, ctx):
        for _ in range(50):
            if not ctx.is_active():
                cancelled[0] += 1
                return b""
            time.sleep(0.1)
        return req

    def cancelled_calls(req, ctx):
        return str(cancelled[0]).encode()

    def hold(req, ctx):
        # Long enough for calls made together to be open together; the answer says
        # which of the edge's connections the call came on.
        time.sleep(0.5)
        return ctx.peer().encode()

    h = lambda f, kind: kind(f, request_deserializer=identity, response_serializer=identity)
    handlers = {
        "Unary": h(unary, grpc.unary_unary_rpc_method_handler),
        "ServerStream": h(server_stream, grpc.unary_stream_rpc_method_handler),
        "ClientStream": h(client_stream, grpc.stream_unary_rpc_method_handler),
        "Bidi": h(bidi, grpc.stream_stream_rpc_method_handler),
        "Fail": h(fail, grpc.unary_unary_rpc_method_handler),
        "Slow": h(slow, grpc.unary_unary_rpc_method_handler),
        "Cancelled": h(cancelled_calls, grpc.unary_unary_rpc_method_handler),
        "Hold": h(hold, grpc.unary_unary_rpc_method_handler),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    server.wait_for_termination()


def serve_h2_early(port):
    """An h2c server that takes the first window of each request's body, never more,
    then answers in full and ends the stream with a NO_ERROR reset: a server may answer
    before it has the whole request (RFC 9113 8.1), as grpc-core does. A proxy still
    sending the body then finds the stream closed, and must pass the answer on. A
    request for /silent is never answered."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.exceptions

    def serve(sock):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        taken, paths = {}, {}
        while data := sock.recv(65536):
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    taken[event.stream_id] = 0
                    paths[event.stream_id] = dict(event.headers)[b":path"]
                elif isinstance(event, h2.events.DataReceived) and event.stream_id in taken:
                    # The stream's window is never given back, so the sender's runs out
                    # at 64 kB; the connection's is, for the streams to come.
                    conn.increment_flow_control_window(event.flow_controlled_length)
                    taken[event.stream_id] += event.flow_controlled_length
                    full = taken[event.stream_id] >= conn.local_settings.initial_window_size
                    if full and paths[event.stream_id] != b"/silent":
                        del taken[event.stream_id]
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        conn.send_data(event.stream_id, b"answered early\n", end_stream=True)
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            sock.sendall(conn.data_to_send())
        sock.close()

    listener = socket.create_server(("::", port), family=socket.AF_INET6, reuse_port=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


def grpc_methods(addr, authority):
    """On one channel to ADDR for AUTHORITY: m(kind, name), the callable of the test
    service's method NAME of KIND (unary_unary, unary_stream, ...)."""
    import grpc

    channel = grpc.insecure_channel(addr, options=[("grpc.default_authority", authority)])
    return lambda kind, name: getattr(channel, kind)(
        f"/{SERVICE}/{name}", request_serializer=identity, response_deserializer=identity
    )


def grpc_client(addr, authority):
    """Every case against one authority; a case that raises records its status code."""
    import grpc

    m = grpc_methods(addr, authority)
    out = {}

    def case(name, f):
        try:
            out[name] = f()
        except grpc.RpcError as e:
            out[name] = {
                "code": e.code().name,
                "details": e.details(),
                "trailers": {k: v for k, v in (e.trailing_metadata() or ())},
            }

    def unary():
        resp, call = m("unary_unary", "Unary").with_call(b"ping", timeout=10)
        trailers = {k: v for k, v in call.trailing_metadata()}
        return {"reply": resp.decode(), "trailers": trailers}

    case("unary", unary)
    case("server_stream", lambda: [r.decode() for r in m("unary_stream", "ServerStream")(b"n", timeout=10)])
    case("client_stream", lambda: m("stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10).decode())
    case("bidi", lambda: [r.decode() for r in m("stream_stream", "Bidi")(iter([b"x", b"y"]), timeout=10)])
    case("fail", lambda: m("unary_unary", "Fail")(b"", timeout=10).decode())
    case("deadline", lambda: m("unary_unary", "Slow")(b"", timeout=0.5).decode())

    def cancel():
        # No deadline for the VM to see: only the reset tells it.
        call = m("unary_unary", "Slow").future(b"", timeout=10)
        time.sleep(0.5)
        call.cancel()
        return "cancelled" if call.cancelled() else "not cancelled"

    case("cancel", cancel)

    def cancelled_on_the_vm():
        # The server looks every 0.1 s; the reset is on its way already.
        for _ in range(30):
            seen = int(m("unary_unary", "Cancelled")(b"", timeout=10).decode())
            if seen > 1:
                return seen
            time.sleep(0.1)
        return 0

    case("cancelled_on_the_vm", cancelled_on_the_vm)

    def large():
        # 3 MB each way: many flow-control windows on both of the edge's connections.
        payload = bytes(i % 251 for i in range(3_000_000))
        resp = m("unary_unary", "Unary")(payload, timeout=20)
        return {"bytes": len(resp), "intact": resp == payload}

    case("large", large)
    print(json.dumps(out))


def grpc_together(addr, authority, calls):
    """CALLS calls of Hold at once, on one client connection; the distinct connections
    (address and port) they reached the VM on."""
    hold = grpc_methods(addr, authority)("unary_unary", "Hold")
    futures = [hold.future(b"", timeout=10) for _ in range(calls)]
    peers = sorted({f.result().decode() for f in futures})
    print(json.dumps({"calls": calls, "vm_connections": peers}))


def stalled_client(mode, method, addr, port, authority, path, wait):
    """A client that stops reading: asks for PATH over MODE (h1, h1-tls or h2c; METHOD
    POST sends a one-byte body, over h2 without content-length), takes the answer's
    header, then reads nothing for WAIT seconds. Then it reads on as any client does (h2
    data acknowledged) until the answer ends ("complete"), the connection or the stream
    is cut ("closed", "reset"), or 10 s pass with nothing ("stuck"). Prints the status,
    the body bytes it got and the end."""
    import ssl

    body = b"x" if method == "POST" else b""
    sock = socket.socket(socket.AF_INET)
    # A small receive buffer, so that what the edge can hand the kernel runs out soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect((addr, port))
    if mode == "h1-tls":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=authority)
    seen = {"status": None, "bytes": 0, "ended": None}
    if mode == "h2c":
        read = h2_stalled_reader(sock, method, authority, path, body, seen)
    else:
        read = h1_stalled_reader(sock, method, authority, path, body, seen)
    sock.settimeout(10)
    try:
        # Up to the answer's header; then the stall; then the rest.
        seen["ended"] = next(read)
        if seen["ended"] is None:
            time.sleep(wait)
            seen["ended"] = next(read)
    except socket.timeout:
        seen["ended"] = "stuck"
    except (ConnectionResetError, ssl.SSLError):
        seen["ended"] = "closed"
    print(json.dumps(seen))


def h1_stalled_reader(sock, method, authority, path, body, seen):
    """Sends the request and reads its answer's header, then (resumed) its body; yields
    how the answer ended."""
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while b"\r\n\r\n" not in got:
        data = sock.recv(4096)
        if not data:
            yield "closed"
            return
        got += data
    header, _, rest = got.partition(b"\r\n\r\n")
    seen["status"] = int(header.split()[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in header.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    seen["bytes"] = len(rest)
    yield None
    while seen["bytes"] < length:
        data = sock.recv(65536)
        if not data:
            yield "closed"
            return
        seen["bytes"] += len(data)
    yield "complete"


def h2_stalled_reader(sock, method, authority, path, body, seen):
    """[h1_stalled_reader] over h2c prior knowledge: no data is acknowledged (no window
    given back) until resumed, so the edge can send only the first 64 KiB."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    # A body without content-length: h2 allows it, and the edge sends it on pingora's path.
    headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers, end_stream=not body)
    if body:
        conn.send_data(stream, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    resumed = False
    while True:
        data = sock.recv(65536)
        if not data:
            yield "closed"
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                seen["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                seen["bytes"] += len(event.data)
                if resumed:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                yield "complete"
                return
            elif isinstance(event, h2.events.StreamReset):
                yield "reset"
                return
            elif isinstance(event, h2.events.ConnectionTerminated):
                yield "closed"
                return
        sock.sendall(conn.data_to_send())
        if seen["status"] is not None and not resumed:
            yield None
            resumed = True
            # What arrived while stalled is given back now, as a reader would.
            if seen["bytes"]:
                conn.acknowledge_received_data(seen["bytes"], stream)
                sock.sendall(conn.data_to_send())


def upload(addr, port, authority, path, size, send):
    """An h2c POST of a SIZE-byte body of which it sends the first SEND bytes, as fast as
    flow control lets it; reads until its stream ends or is reset. Prints the answer's
    status (None if none came) and body, how the stream ended (complete, reset and the
    reason, closed, stuck: 30 s with nothing) and the body bytes sent."""
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection((addr, port))
    sock.settimeout(30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", authority)]
    conn.send_headers(stream, headers + [("content-length", str(size))])
    seen = {"status": None, "body": "", "ended": None, "sent": 0}

    def send_more():
        while seen["sent"] < send and seen["ended"] is None:
            room = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if room <= 0:
                return
            n = min(room, send - seen["sent"])
            seen["sent"] += n
            conn.send_data(stream, b"x" * n, end_stream=seen["sent"] == size)

    send_more()
    sock.sendall(conn.data_to_send())
    while seen["ended"] is None:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            seen["ended"] = "stuck"
            break
        if not data:
            seen["ended"] = "closed"
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                seen["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                seen["body"] += event.data.decode(errors="replace")
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded):
                seen["ended"] = "complete"
            elif isinstance(event, h2.events.StreamReset) and seen["ended"] is None:
                # A NO_ERROR reset after a complete answer only stops the upload.
                seen["ended"] = f"reset {event.error_code.name}"
        send_more()
        sock.sendall(conn.data_to_send())
    print(json.dumps(seen))


def main():
    what = sys.argv[1]
    if what == "http":
        serve_http(int(sys.argv[2]))
    elif what == "ws":
        asyncio.run(serve_ws(int(sys.argv[2])))
    elif what == "grpc":
        serve_grpc(int(sys.argv[2]))
    elif what == "h2-early":
        serve_h2_early(int(sys.argv[2]))
    elif what == "ws-client":
        asyncio.run(ws_client(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif what == "grpc-client":
        grpc_client(sys.argv[2], sys.argv[3])
    elif what == "grpc-together":
        grpc_together(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif what == "stalled-upload":
        upload(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], 1000, 10)
    elif what == "upload":
        size = int(sys.argv[6])
        upload(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], size, size)
    elif what == "stalled-client":
        mode, method, addr, port, authority, path, wait = sys.argv[2:9]
        stalled_client(mode, method, addr, int(port), authority, path, float(wait))
    else:
        sys.exit(f"unknown: {what}")


if __name__ == "__main__":
    main()
