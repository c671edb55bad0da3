#!/usr/bin/env python3
"""Probes two nodes of a clustered MQTT 5 broker for what Quva's bridges need of it.

Standard library only (a small hand-written MQTT 5 encoder and decoder): no paho needed.

    python3 scripts/scale-out/mqtt5_probe.py --node1 127.0.0.2:18831 --node2 127.0.0.3:18832 \
        --username bridge@quva.test --password quva-bridge-secret

Each check prints PASS or FAIL with what was seen; the exit status is the number of failures.
The checks, all across the two nodes (publisher on one, subscriber on the other):
  auth         the bridge's account connects; a wrong password, an unknown user and no
               credentials are refused with an MQTT 5 reason code
  props        a PUBLISH's user properties (order kept), content type, response topic and
               correlation data reach a subscriber on the other node
  reason       SUBACK grants QoS 1; PUBACK carries a reason code; a takeover disconnects the
               old connection (0x8E) when the same client ID connects on the other node
  retained     a retained message published on node 1 reaches a later subscriber on node 2,
               with its user properties; an empty retained message clears it on both
  qos1         QoS 1 from node 1 to node 2: received as QoS 1 with a packet ID, PUBACKed
  session      clean start off + session expiry 300 s on node 1, subscription, disconnect;
               messages published while away are delivered on resumption on node 2 (session
               present = 1); a clean start on node 2 forgets the session
  big          64 KiB payload across nodes, byte for byte
"""

import argparse
import os
import socket
import struct
import sys
import time

# --- encoding ----------------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

# Property identifier -> type (MQTT 5.0 section 2.2.2.2).
PROP_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte",
    0x18: "u32", 0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16",
    0x22: "u16", 0x23: "u16", 0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32",
    0x28: "byte", 0x29: "byte", 0x2A: "byte",
}
USER_PROPERTY = 0x26


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def props(items):
    """items: list of (id, value); user properties as (0x26, (k, v))."""
    body = bytearray()
    for pid, val in items:
        body += varint(pid)
        kind = PROP_TYPES[pid]
        if kind == "byte":
            body.append(val)
        elif kind == "u16":
            body += struct.pack("!H", val)
        elif kind == "u32":
            body += struct.pack("!I", val)
        elif kind == "varint":
            body += varint(val)
        elif kind in ("str", "bin"):
            body += s(val)
        elif kind == "pair":
            body += s(val[0]) + s(val[1])
    return varint(len(body)) + bytes(body)


def packet(kind, flags, body):
    return bytes([(kind << 4) | flags]) + varint(len(body)) + body


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, n):
        out = self.data[self.at:self.at + n]
        if len(out) != n:
            raise ValueError("short packet")
        self.at += n
        return out

    def byte(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("!H", self.take(2))[0]

    def u32(self):
        return struct.unpack("!I", self.take(4))[0]

    def varint(self):
        n, mul = 0, 1
        while True:
            b = self.byte()
            n += (b & 0x7F) * mul
            mul *= 128
            if not b & 0x80:
                return n

    def string(self):
        return self.take(self.u16())

    def props(self):
        end = self.varint() + self.at
        out = []
        while self.at < end:
            pid = self.varint()
            kind = PROP_TYPES[pid]
            if kind == "byte":
                val = self.byte()
            elif kind == "u16":
                val = self.u16()
            elif kind == "u32":
                val = self.u32()
            elif kind == "varint":
                val = self.varint()
            elif kind == "str":
                val = self.string().decode()
            elif kind == "bin":
                val = self.string()
            else:
                val = (self.string().decode(), self.string().decode())
            out.append((pid, val))
        return out

    def rest(self):
        return self.data[self.at:]


class Client:
    """One MQTT 5 connection; incoming QoS 1 PUBLISHes are acknowledged as they are read."""

    def __init__(self, addr, name):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.name, self.buf, self.next_id, self.pending = name, b"", 1, []

    def send(self, data):
        self.sock.sendall(data)

    def connect(self, client_id, username=None, password=None, clean=True, expiry=0,
                keepalive=60):
        flags = 0x02 if clean else 0
        payload = s(client_id)
        if username is not None:
            flags |= 0x80
        if password is not None:
            flags |= 0x40
        body = s("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
        body += props([(0x11, expiry)] if expiry else [])
        body += payload
        if username is not None:
            body += s(username)
        if password is not None:
            body += s(password)
        self.send(packet(CONNECT, 0, body))
        kind, _, body = self.read(10)
        if kind != CONNACK:
            raise ValueError(f"expected CONNACK, got {kind}")
        r = Reader(body)
        ack_flags, reason = r.byte(), r.byte()
        return {"session_present": bool(ack_flags & 1), "reason": reason, "props": r.props()}

    def subscribe(self, topic, qos=1):
        pid = self._id()
        body = struct.pack("!H", pid) + props([]) + s(topic) + bytes([qos])
        self.send(packet(SUBSCRIBE, 0x02, body))
        kind, _, body = self.expect(SUBACK)
        r = Reader(body)
        r.u16()
        r.props()
        return list(r.rest())

    def publish(self, topic, payload, qos=0, retain=False, properties=()):
        body = s(topic)
        pid = None
        if qos:
            pid = self._id()
            body += struct.pack("!H", pid)
        body += props(list(properties)) + payload
        self.send(packet(PUBLISH, (qos << 1) | (1 if retain else 0), body))
        if not qos:
            return None
        kind, _, body = self.expect(PUBACK)
        r = Reader(body)
        got = r.u16()
        assert got == pid, (got, pid)
        return r.byte() if len(body) > 2 else 0

    def disconnect(self, reason=0, expiry=None):
        body = bytes([reason]) + props([(0x11, expiry)] if expiry is not None else [])
        self.send(packet(DISCONNECT, 0, body))
        self.sock.close()

    def close(self):
        self.sock.close()

    def _id(self):
        pid = self.next_id
        self.next_id += 1
        return pid

    def read(self, timeout):
        """Reads one packet: (type, flags, body); None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse()
            if parsed:
                return parsed
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536 + 1024)
            except socket.timeout:
                return None
            if not chunk:
                return (None, 0, b"")  # closed by the broker
            self.buf += chunk

    def _parse(self):
        if len(self.buf) < 2:
            return None
        n, mul, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            n += (b & 0x7F) * mul
            mul *= 128
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + n:
            return None
        head, body = self.buf[0], self.buf[i:i + n]
        self.buf = self.buf[i + n:]
        return (head >> 4, head & 0x0F, body)

    def expect(self, kind, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(max(0.0, deadline - time.monotonic()))
            if got is None:
                raise TimeoutError(f"{self.name}: no packet {kind}")
            if got[0] == kind:
                return got
            if got[0] == PUBLISH:
                self.pending.append(self._publish(got))
            elif got[0] is None:
                raise ConnectionError(f"{self.name}: closed while waiting for {kind}")

    def _publish(self, got):
        _, flags, body = got
        r = Reader(body)
        topic = r.string().decode()
        qos = (flags >> 1) & 3
        pid = r.u16() if qos else None
        properties = r.props()
        if qos == 1:
            self.send(packet(PUBACK, 0, struct.pack("!H", pid) + bytes([0]) + props([])))
        return {"topic": topic, "qos": qos, "retain": bool(flags & 1), "pid": pid,
                "props": properties, "payload": r.rest()}

    def message(self, timeout=5):
        """The next PUBLISH received (None on timeout)."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(max(0.0, deadline - time.monotonic()))
            if got is None or got[0] is None:
                return None
            if got[0] == PUBLISH:
                return self._publish(got)

    def disconnected(self, timeout=5):
        """The reason code of a DISCONNECT from the broker (or 'closed'); None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            if got[0] is None:
                return "closed"
            if got[0] == DISCONNECT:
                return got[2][0] if got[2] else 0


# --- checks ------------------------------------------------------------------------------------

class Probe:
    def __init__(self, args):
        self.a, self.failures, self.run_id = args, 0, os.urandom(3).hex()

    def report(self, name, ok, detail):
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failures += 1

    def client(self, node, cid, **kw):
        c = Client(self.a.node1 if node == 1 else self.a.node2, cid)
        ack = c.connect(f"{cid}-{self.run_id}", self.a.username, self.a.password, **kw)
        if ack["reason"] != 0:
            raise RuntimeError(f"{cid} refused on node {node}: 0x{ack['reason']:02x}")
        return c, ack

    def topic(self, name):
        return f"quva/k/probe-{self.run_id}/{name}"

    def check_auth(self):
        c, ack = self.client(1, "auth-ok")
        self.report("auth: bridge account on node 1", ack["reason"] == 0,
                    f"CONNACK 0x{ack['reason']:02x}")
        c.disconnect()
        c, ack = self.client(2, "auth-ok2")
        self.report("auth: bridge account on node 2", ack["reason"] == 0,
                    f"CONNACK 0x{ack['reason']:02x}")
        c.disconnect()
        for what, user, pw in (("wrong password", self.a.username, "not-the-password"),
                               ("unknown user", "intruder@quva.test", "x"),
                               ("no credentials", None, None)):
            c = Client(self.a.node2, what)
            try:
                ack = c.connect(f"auth-bad-{self.run_id}", user, pw)
                ok = ack["reason"] >= 0x80
                self.report(f"auth: {what} refused", ok, f"CONNACK 0x{ack['reason']:02x}")
            except (ConnectionError, ValueError, OSError) as e:
                self.report(f"auth: {what} refused", True, f"connection closed ({e})")
            c.close()

    def check_props_reason(self):
        t = self.topic("props")
        sub, _ = self.client(2, "sub-props")
        granted = sub.subscribe(t, 1)
        self.report("reason: SUBACK grants QoS 1", granted == [1], f"SUBACK {granted}")
        pub, _ = self.client(1, "pub-props")
        time.sleep(0.5)
        sent = [(USER_PROPERTY, ("quva-a", "1")), (USER_PROPERTY, ("quva-b", "two")),
                (USER_PROPERTY, ("quva-a", "3")), (0x03, "application/quva"),
                (0x08, "reply/topic"), (0x09, b"\x00corr\xff")]
        code = pub.publish(t, b"with properties", 1, properties=sent)
        self.report("reason: PUBACK carries a reason code", code in (0, 0x10),
                    f"PUBACK 0x{code:02x}")
        m = sub.message()
        got_user = [p for p in (m or {}).get("props", []) if p[0] == USER_PROPERTY]
        want_user = [p for p in sent if p[0] == USER_PROPERTY]
        self.report("props: user properties cross nodes in order", m is not None and
                    got_user == want_user, f"got {got_user}")
        other = {pid: v for pid, v in (m or {}).get("props", []) if pid != USER_PROPERTY}
        self.report("props: content type, response topic, correlation data cross nodes",
                    other.get(0x03) == "application/quva" and other.get(0x08) ==
                    "reply/topic" and other.get(0x09) == b"\x00corr\xff", f"got {other}")
        # Takeover: the same client ID on the other node ends the first connection.
        first, _ = self.client(1, "takeover")
        second, ack = self.client(2, "takeover")
        code = first.disconnected(5)
        self.report("reason: takeover across nodes ends the old connection",
                    code in (0x8E, "closed"),
                    f"old connection got {code if code is None or code == 'closed' else hex(code)}"
                    f", new CONNACK 0x{ack['reason']:02x}")
        for c in (sub, pub, second):
            c.disconnect()

    def check_retained(self):
        t = self.topic("retained")
        pub, _ = self.client(1, "pub-ret")
        pub.publish(t, b"notice epoch 7", 1, retain=True,
                    properties=[(USER_PROPERTY, ("quva-notice", "7"))])
        time.sleep(1.0)
        sub, _ = self.client(2, "sub-ret")
        sub.subscribe(t, 1)
        m = sub.message()
        self.report("retained: published on node 1, delivered on node 2",
                    m is not None and m["payload"] == b"notice epoch 7" and m["retain"],
                    f"got {m and (m['payload'], m['retain'])}")
        self.report("retained: user properties kept", m is not None and
                    (USER_PROPERTY, ("quva-notice", "7")) in m["props"],
                    f"got {m and m['props']}")
        sub.disconnect()
        if m is None:
            print("SKIP retained: replacement and clearing (nothing retained crossed the nodes)")
            pub.disconnect()
            return
        pub.publish(t, b"notice epoch 8", 1, retain=True)
        time.sleep(1.0)
        sub, _ = self.client(2, "sub-ret2")
        sub.subscribe(t, 1)
        m = sub.message()
        self.report("retained: a newer retained message replaces the older on node 2",
                    m is not None and m["payload"] == b"notice epoch 8",
                    f"got {m and m['payload']}")
        extra = sub.message(1)
        self.report("retained: only one retained message per topic", extra is None,
                    f"extra {extra and extra['payload']}")
        sub.disconnect()
        pub.publish(t, b"", 1, retain=True)
        time.sleep(1.0)
        sub, _ = self.client(2, "sub-ret3")
        sub.subscribe(t, 1)
        m = sub.message(2)
        self.report("retained: an empty retained message clears it on node 2", m is None,
                    f"got {m and m['payload']}")
        sub.disconnect()
        pub.disconnect()

    def check_qos1(self):
        t = self.topic("qos1")
        sub, _ = self.client(2, "sub-q1")
        sub.subscribe(t, 1)
        pub, _ = self.client(1, "pub-q1")
        time.sleep(0.5)
        got = []
        for i in range(20):
            pub.publish(t, f"m{i}".encode(), 1)
        for _ in range(20):
            m = sub.message()
            if m is None:
                break
            got.append(m)
        ok = [m["payload"] for m in got] == [f"m{i}".encode() for i in range(20)]
        self.report("qos1: 20 messages node 1 -> node 2 in order", ok,
                    f"got {len(got)}: {[m['payload'] for m in got][:5]}...")
        self.report("qos1: delivered as QoS 1 with packet IDs",
                    bool(got) and all(m["qos"] == 1 and m["pid"] for m in got),
                    f"qos {sorted({m['qos'] for m in got})}")
        sub.disconnect()
        pub.disconnect()

    def check_session(self):
        t = self.topic("session")
        dev, ack = self.client(1, "dev-sess", clean=True, expiry=300)
        dev.disconnect()
        dev, ack = self.client(1, "dev-sess", clean=False, expiry=300)
        dev.subscribe(t, 1)
        dev.disconnect()  # session kept for 300 s
        pub, _ = self.client(2, "pub-sess")
        time.sleep(0.5)
        for i in range(3):
            pub.publish(t, f"while away {i}".encode(), 1)
        time.sleep(1.0)
        dev, ack = self.client(2, "dev-sess", clean=False, expiry=300)
        self.report("session: resumed on node 2 with session present",
                    ack["session_present"], f"CONNACK session_present={ack['session_present']}")
        got = []
        while True:
            m = dev.message(3)
            if m is None:
                break
            got.append(m["payload"])
        want = [f"while away {i}".encode() for i in range(3)]
        self.report("session: messages queued while away delivered on node 2", got == want,
                    f"got {got}")
        pub.publish(t, b"after resume", 1)
        m = dev.message()
        self.report("session: the subscription lives on after resumption on node 2",
                    m is not None and m["payload"] == b"after resume",
                    f"got {m and m['payload']}")
        dev.disconnect()
        dev, ack = self.client(1, "dev-sess", clean=True, expiry=0)
        self.report("session: clean start on node 1 forgets it", not ack["session_present"],
                    f"session_present={ack['session_present']}")
        dev.disconnect()
        pub.disconnect()

    def check_big(self):
        t = self.topic("big")
        sub, _ = self.client(2, "sub-big")
        sub.subscribe(t, 1)
        pub, _ = self.client(1, "pub-big")
        time.sleep(0.5)
        payload = os.urandom(64 * 1024)
        code = pub.publish(t, payload, 1, properties=[(USER_PROPERTY, ("quva", "big"))])
        m = sub.message(10)
        self.report("big: 64 KiB payload node 1 -> node 2", m is not None and
                    m["payload"] == payload, f"PUBACK 0x{code:02x}, got "
                    f"{len(m['payload']) if m else None} bytes")
        sub.disconnect()
        pub.disconnect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--node1", required=True)
    ap.add_argument("--node2", required=True)
    ap.add_argument("--username", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    probe = Probe(args)
    for name in ("auth", "props_reason", "retained", "qos1", "session", "big"):
        if args.only and name not in args.only:
            continue
        try:
            getattr(probe, f"check_{name}")()
        except Exception as e:  # a check that cannot even run counts as failed
            probe.report(name, False, f"{type(e).__name__}: {e}")
    print(f"{probe.failures} failed")
    sys.exit(min(probe.failures, 100))


if __name__ == "__main__":
    main()
