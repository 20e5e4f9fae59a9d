#!/usr/bin/env python3
"""Differential conformance run: the original Python 2 GM-chat app vs gm-relay.

Starts (loopback only, free ports, temp dirs) two redis-servers, nats-server with JetStream,
a role-service stub, the original app (conformance/original_app.py under Python 2.7.18)
and `target/debug/gm-relay serve`; replays N seeded random legacy requests against both,
one at a time; compares the replies; classifies each difference as allowed (a deliberate
difference of LEGACY_PROTOCOL.md, predicted by the models below) or unexpected.

    python3 conformance/run.py --requests 2000 --seed 1

Exit status: 0 when no unexpected mismatch, 1 otherwise, 2 when the set-up failed.

How a difference is judged: two small models run alongside the servers. `OrigWorld` is
the original app's semantics (raw-text ids, its bugs), `RelayWorld` the relay's documented
semantics. Each request is applied to both models, giving a predicted reply per side. A
difference between the real replies is *allowed* only when the models predicted exactly
that difference (real original == predicted original and real relay == predicted relay),
and the models can only differ through the deliberate differences listed in
LEGACY_PROTOCOL.md. Everything else is *unexpected*.
"""

import argparse
import base64
import collections
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ----------------------------------------------------------------------------------------
# Universe
# ----------------------------------------------------------------------------------------

GMS = [b"1", b"2", b"-5", b"9223372036854775807"]
HOSTS = [b"-9223372036854775808", b"7", b"1001"]  # 1001 >= 1000: the role service is asked
UIDS = [b"0", b"101", b"102", b"103", b"104", b"-7", b"4611686018427387904", b"108"]
ODD_GMS = [b"50", b"51", b"52"]  # only used for gm_name validation cases
SPARE_UIDS = [b"901", b"902", b"903"]  # canonical, outside the universe: for original-only adds
# "edge" cases (query shapes and role replies the protocol does not list as differences) use
# their own GM, host and players, never polled, so a divergence there cannot spread.
EDGE_GM, EDGE_HOST = b"53", b"2002"

# Role stub replies by uid (as the stub receives it): (HTTP status, body). Default:
# 200 {"code": 1, "name": "role"}. Both servers must read them as Python 2 did.
ROLE_REPLIES = {
    "104": (200, b'{"code": 0}'),
    "103": (200, b"[1]"),
    "108": (500, b"internal error"),
    "-7": (200, b"<html>not json</html>"),
}
# Edge players get fresh uids (so one divergence cannot cascade); their role replies:
EDGE_ROLE_REPLIES = [
    (b"7211", (200, b'{"code": 1.0}')),  # Python: 1.0 == 1
    (b"7212", (200, b'{"code": true}')),  # Python: True == 1
    (b"7215", (200, b'{"code": "1"}')),  # "1" != 1 in Python too
    (b"7216", (200, b'{"code": 1, "extra": null}')),
]
DEFAULT_ROLE_REPLY = (200, b'{"code": 1, "name": "role"}')

MSG_TEXTS = [
    "hi", "你好", "在吗？", "玩家你好，请问有什么可以帮您", "a+b/c?=&;#", "😀👍", "ok",
    "GM: 请稍等", "line1\nline2", "tab\there", "<b>bold</b> \"q\" \\", "100%", "~~~>>>???",
    "ÿþý", "\u2028\u00a0", "中" * 500, "x" * 500, "结束", ",", "+/+/", "😀" * 500, "\x01\x7f",
]
NAMES = [
    "客服小王", "Alice", "GM Bob", "运营-01", "😀 smile", "a+b", "100%", "名字很长" * 16,
    "x" * 64, "tab\tname", "O'Brien \"Q\"", "😀" * 64, "ctl\x01\x7f\u2028", "  spaced  ",
]
NONCANON_IDS = [b"007", b"+5", b" 5", b"5 ", b"-0", b"01", b"1e3", b"*", b">", b"",
                b"123456789012345678901234567890", b"9223372036854775808", b"a.b", b"0x10"]
NONCANON_HOSTS = [b"+7", b"007", b" 7", b"-0", b"*", b">", b"", b"1.0", b"00"]

GM_ACTIONS = {
    "create": ["gm_account", "gm_name"],
    "add": ["gm_account", "host", "uid"],
    "del": ["gm_account", "uid"],
    "online": ["gm_account"],
    "offline": ["gm_account"],
    "send": ["gm_account", "uid", "msg"],
    "receive": [],
}
GS_ACTIONS = {
    "relation": ["host"],
    "send": ["uid", "msg"],
    "receive": ["host"],
    "online": ["host"],
}
ID_KEYS = ("gm_account", "host", "uid")

# Kinds of allowed differences (LEGACY_PROTOCOL.md, "Where the relay deliberately differs").
K_MISSING = "missing parameter: original 500, relay errno -1 (or 404 for a missing action)"
K_NONCANON = "non-canonical id: original takes the raw text, relay errno -1"
K_EMPTY_NAME = "empty gm_name: original stores a GM it treats as nonexistent, relay -1"
K_NAME_RULES = "gm_name not UTF-8 or over 64 chars: original stores it, relay -1 (errno table)"
K_MSG = "msg not strict base64/UTF-8/1..500 chars: original stores it, relay errno 6"
K_ROLE = "role service failure: original 500, relay errno 7"
K_REMOVED = "messages of a removed friendship: relay delivers to the send-time GM/host"
K_READD = "re-add on another host: original drops the pending friend-remove"


def is_canon(b):
    if not re.fullmatch(rb"0|-?[1-9][0-9]*", b) or len(b) > 20:
        return False
    return -(2 ** 63) <= int(b) < 2 ** 63


def py2_int_ok(b):
    """Whether Python 2's int() accepts this byte string."""
    return re.fullmatch(rb"[ \t\n\r\x0b\x0c]*[+-]?[ \t\n\r\x0b\x0c]*[0-9]+[ \t\n\r\x0b\x0c]*", b) is not None


def py2_int(b):
    s = b.strip(b" \t\n\r\x0b\x0c")
    sign = -1 if s.startswith(b"-") else 1
    return sign * int(s.lstrip(b"+-").strip())


def relay_msg_ok(m):
    if not m or len(m) > 2668:
        return False
    try:
        raw = base64.b64decode(m, validate=True)
    except Exception:
        return False
    if base64.b64encode(raw) != m:
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return 1 <= len(text) <= 500


def relay_name_ok(n):
    try:
        text = n.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return 1 <= len(text) <= 64


def form_decode(b):
    return urllib.parse.unquote_to_bytes(b.replace(b"+", b" "))


def unquote(b):
    return urllib.parse.unquote_to_bytes(b)


def parse_query(raw):
    """The original's parsing, which the protocol says the relay reproduces: split on '&',
    form-decode keys and values, first value wins; as parse_qs(keep_blank_values=True), a
    piece without '=' is a key with an empty value. (Python 2's parse_qs also splits on
    ';'; LEGACY_PROTOCOL.md says '&' only, and the generator never sends a raw ';'.)"""
    params = {}
    for piece in raw.split(b"&"):
        if not piece:
            continue
        k, _, v = piece.partition(b"=")
        params.setdefault(form_decode(k).decode("latin-1"), form_decode(v))
    return params


def pydumps(obj):
    """Python 2 json.dumps layout (Python 3's defaults are the same)."""
    return json.dumps(obj)


def s(b):
    return b.decode("utf-8") if isinstance(b, bytes) else b


def reply_json(obj, status=200):
    return (status, "text/html", pydumps(obj).encode())


def b64json(obj):
    return base64.b64encode(pydumps(obj).encode()).decode()


def role_answer(uid_text):
    """How the original reads the stub's reply for this uid: 'ok', 'refused' (errno 4) or
    'broken' (urllib2/json raise: original 500, relay errno 7)."""
    status, body = ROLE_REPLIES.get(uid_text, DEFAULT_ROLE_REPLY)
    if status != 200:
        return "broken"
    try:
        res = json.loads(body)
    except ValueError:
        return "broken"
    if not isinstance(res, dict) or res.get("code", 0) != 1:
        return "refused"
    return "ok"


class Crash(Exception):
    """The original app raised: HTTP 500."""


# ----------------------------------------------------------------------------------------
# Model of the original app (raw-text ids, its Redis layout and its bugs)
# ----------------------------------------------------------------------------------------

class OrigWorld:
    def __init__(self):
        self.names = {}
        self.online = set()
        self.friends = collections.defaultdict(set)
        self.uid_host = {}
        self.uid_gm = {}
        self.q_gm = collections.defaultdict(list)  # msg_from_gm, oldest first
        self.q_gs = collections.defaultdict(list)  # msg_from_gs, oldest first
        self.gm_newmsg = set()
        self.gs_newmsg = set()
        self.apply = set()
        self.remove = {}

    def exists(self, gm):
        return bool(self.names.get(gm))

    @staticmethod
    def need(p, k):
        if k not in p:
            raise Crash("KeyError %s" % k)
        return p[k]

    def handle(self, side, p):
        try:
            return self._handle(side, p)
        except Crash:
            return (500, None, b"")

    def _handle(self, side, p):
        action = self.need(p, "action")
        table = GM_ACTIONS if side == "gm" else GS_ACTIONS
        key = action.decode("latin-1")
        if key not in table:
            return (404, "text/html", b"err action " + action)
        return getattr(self, side + "_" + key)(p)

    def err(self, n):
        return reply_json({"res": 0, "errno": n})

    def gm_create(self, p):
        gm, name = self.need(p, "gm_account"), unquote(self.need(p, "gm_name"))
        if not py2_int_ok(gm):
            return self.err(-1)
        if self.exists(gm):
            return self.err(1)
        self.names[gm] = name
        self.online.add(gm)
        return reply_json({"res": 1})

    def role_verdict(self, uid, host):
        url = b"/role?uid=" + uid + b"&hostnum=" + host
        if re.search(rb"[\x00-\x20\x7f-\x9f]", url):
            raise Crash("InvalidURL")
        got = urllib.parse.parse_qs(url.split(b"?", 1)[1].decode("latin-1"), keep_blank_values=True)
        verdict = role_answer(got.get("uid", [""])[0])
        if verdict == "broken":
            raise Crash("role service")
        return verdict

    def gm_add(self, p):
        gm, host, uid = self.need(p, "gm_account"), self.need(p, "host"), self.need(p, "uid")
        for num in (gm, host, uid):
            if not py2_int_ok(num):
                return self.err(-1)
        if not self.exists(gm):
            return self.err(2)
        if self.uid_gm.get(uid):
            return self.err(3)
        if py2_int(host) >= 1000:
            if self.role_verdict(uid, host) != "ok":
                return self.err(4)
        self.friends[gm].add(uid)
        self.uid_host[uid] = host
        self.uid_gm[uid] = gm
        self.apply.add(uid)
        self.remove.pop(uid, None)
        return reply_json({"res": 1})

    def gm_del(self, p):
        gm, uid = self.need(p, "gm_account"), self.need(p, "uid")
        if not self.exists(gm):
            return self.err(2)
        if self.uid_gm.get(uid) != gm:
            return self.err(5)
        if uid not in self.friends[gm]:
            return self.err(4)
        self.friends[gm].discard(uid)
        host = self.uid_host.pop(uid, None)
        self.uid_gm.pop(uid, None)
        if host is None:
            raise Crash("hset None")  # redis-py 3 refuses None; unreachable sequentially
        self.remove[uid] = host
        self.apply.discard(uid)
        return reply_json({"res": 1})

    def gm_online(self, p):
        gm = self.need(p, "gm_account")
        if not self.exists(gm):
            return self.err(2)
        self.online.add(gm)
        return reply_json({"res": 1})

    def gm_offline(self, p):
        gm = self.need(p, "gm_account")
        if gm not in self.online:
            return reply_json({"res": 0})
        self.online.discard(gm)
        return reply_json({"res": 1})

    def gm_send(self, p):
        gm, uid, msg = self.need(p, "gm_account"), self.need(p, "uid"), unquote(self.need(p, "msg"))
        if uid not in self.friends[gm]:
            return self.err(4)
        if self.uid_gm.get(uid) != gm:
            return self.err(5)
        self.q_gm[uid].append(msg)
        self.gm_newmsg.add(uid)
        return reply_json({"res": 1})

    @staticmethod
    def pop10(queue):
        taken = queue[:10]
        del queue[:10]
        return taken

    def gm_receive(self, p):
        data = {}
        for uid in sorted(self.gs_newmsg):
            gm = self.uid_gm.get(uid)
            if not gm:
                continue
            joined = b",".join(self.pop10(self.q_gs[uid]))
            if not joined:
                continue
            data.setdefault(s(gm), []).append({"uid": s(uid), "msg": s(joined)})
        return reply_json({"res": 1, "data": b64json(data)})

    def gs_relation(self, p):
        host = self.need(p, "host")
        apply_data = {}
        for uid in sorted(self.apply):
            if self.uid_host.get(uid) != host:
                continue
            gm = self.uid_gm.get(uid)
            if not gm:
                continue
            name = self.names.get(gm)
            apply_data[s(uid)] = [s(gm), s(name) if name is not None else None]
            self.apply.discard(uid)
        remove_list = []
        for uid in sorted(self.remove):
            if self.remove[uid] != host:
                continue
            remove_list.append(s(uid))
            del self.remove[uid]
        return reply_json({"res": 1, "apply_data": b64json(apply_data),
                           "remove_data": b64json(remove_list)})

    def gs_send(self, p):
        uid, msg = self.need(p, "uid"), unquote(self.need(p, "msg"))
        if not self.uid_gm.get(uid):
            return self.err(5)
        self.q_gs[uid].append(msg)
        self.gs_newmsg.add(uid)
        return reply_json({"res": 1})

    def gs_receive(self, p):
        host = self.need(p, "host")
        out = []
        for uid in sorted(self.gm_newmsg):
            if self.uid_host.get(uid) != host:
                continue
            joined = b",".join(self.pop10(self.q_gm[uid]))
            if not joined:
                continue
            out.append({"uid": s(uid), "msg": s(joined)})
        return reply_json({"res": 1, "data": b64json(out)})

    def gs_online(self, p):
        host = self.need(p, "host")
        out = [s(gm) for gm in sorted(self.online)
               if any(self.uid_host.get(u) == host for u in self.friends[gm])]
        return reply_json({"res": 1, "data": b64json(out)})

    # for the generator and the cause bookkeeping
    def pending_msgs(self, uid):
        return bool(self.q_gm.get(uid)) or bool(self.q_gs.get(uid))


# ----------------------------------------------------------------------------------------
# Model of gm-relay as LEGACY_PROTOCOL.md specifies it
# ----------------------------------------------------------------------------------------

class Reject(Exception):
    def __init__(self, errno):
        self.errno = errno


class RelayWorld:
    def __init__(self):
        self.names = {}
        self.online = set()
        self.link = {}  # uid -> (gm, host)
        self.friends = collections.defaultdict(set)
        self.host_chat = collections.defaultdict(list)  # host -> [(uid, msg)] in stream order
        self.host_rel = collections.defaultdict(list)  # host -> [(uid, kind, gm, name)]
        self.gm_chat = []  # [(gm, uid, msg)]

    def handle(self, side, p):
        table = GM_ACTIONS if side == "gm" else GS_ACTIONS
        action = p.get("action", b"")
        key = action.decode("latin-1")
        if key not in table:
            return (404, "text/html", b"err action " + action)
        try:
            return getattr(self, side + "_" + key)(p)
        except Reject as r:
            return reply_json({"res": 0, "errno": r.errno})

    @staticmethod
    def present(p, *keys):
        for k in keys:
            if k not in p:
                raise Reject(-1)

    @staticmethod
    def canon(p, *keys):
        for k in keys:
            if k not in p or not is_canon(p[k]):
                raise Reject(-1)
        return [p[k] for k in keys]

    def gm_create(self, p):
        self.present(p, "gm_account", "gm_name")
        (gm,) = self.canon(p, "gm_account")
        name = unquote(p["gm_name"])
        if not relay_name_ok(name):
            raise Reject(-1)
        if gm in self.names:
            raise Reject(1)
        self.names[gm] = name
        self.online.add(gm)
        return reply_json({"res": 1})

    def gm_add(self, p):
        self.present(p, "gm_account", "host", "uid")
        gm, host, uid = self.canon(p, "gm_account", "host", "uid")
        if gm not in self.names:
            raise Reject(2)
        if uid in self.link:
            raise Reject(3)
        if int(host) >= 1000:
            verdict = role_answer(uid.decode())
            if verdict == "broken":
                raise Reject(7)
            if verdict == "refused":
                raise Reject(4)
        self.link[uid] = (gm, host)
        self.friends[gm].add(uid)
        self.host_rel[host].append((uid, "add", gm, self.names[gm]))
        return reply_json({"res": 1})

    def gm_del(self, p):
        self.present(p, "gm_account", "uid")
        gm, uid = self.canon(p, "gm_account", "uid")
        if gm not in self.names:
            raise Reject(2)
        if self.link.get(uid, (None, None))[0] != gm:
            raise Reject(5)
        if uid not in self.friends[gm]:
            raise Reject(4)
        _, host = self.link.pop(uid)
        self.friends[gm].discard(uid)
        self.host_rel[host].append((uid, "remove", gm, self.names[gm]))
        return reply_json({"res": 1})

    def gm_online(self, p):
        (gm,) = self.canon(p, "gm_account")
        if gm not in self.names:
            raise Reject(2)
        self.online.add(gm)
        return reply_json({"res": 1})

    def gm_offline(self, p):
        (gm,) = self.canon(p, "gm_account")
        if gm not in self.online:
            return reply_json({"res": 0})
        self.online.discard(gm)
        return reply_json({"res": 1})

    def gm_send(self, p):
        self.present(p, "gm_account", "uid", "msg")
        gm, uid = self.canon(p, "gm_account", "uid")
        msg = unquote(p["msg"])
        if uid not in self.friends[gm]:
            raise Reject(4)
        if self.link.get(uid, (None, None))[0] != gm:
            raise Reject(5)
        if not relay_msg_ok(msg):
            raise Reject(6)
        self.host_chat[self.link[uid][1]].append((uid, msg))
        return reply_json({"res": 1})

    @staticmethod
    def drain_chat(pending, key_of):
        """Up to 10 per key, oldest first; the rest stay, in order."""
        entries, order, rest = {}, [], []
        for item in pending:
            k = key_of(item)
            if k not in entries:
                entries[k] = []
                order.append(k)
            if len(entries[k]) < 10:
                entries[k].append(item)
            else:
                rest.append(item)
        return order, entries, rest

    def gm_receive(self, p):
        order, entries, rest = self.drain_chat(self.gm_chat, lambda it: (it[0], it[1]))
        self.gm_chat = rest
        data = {}
        for gm, uid in order:
            msgs = b",".join(it[2] for it in entries[(gm, uid)])
            data.setdefault(s(gm), []).append({"uid": s(uid), "msg": s(msgs)})
        return reply_json({"res": 1, "data": b64json(data)})

    def gs_relation(self, p):
        (host,) = self.canon(p, "host")
        latest = {}
        for ev in self.host_rel[host]:
            latest[ev[0]] = ev
        self.host_rel[host] = []
        apply_data, remove = {}, []
        for uid, (_, kind, gm, name) in latest.items():
            if kind == "add":
                apply_data[s(uid)] = [s(gm), s(name)]
            else:
                remove.append(s(uid))
        return reply_json({"res": 1, "apply_data": b64json(apply_data), "remove_data": b64json(remove)})

    def gs_send(self, p):
        self.present(p, "uid", "msg")
        (uid,) = self.canon(p, "uid")
        msg = unquote(p["msg"])
        if uid not in self.link:
            raise Reject(5)
        if not relay_msg_ok(msg):
            raise Reject(6)
        self.gm_chat.append((self.link[uid][0], uid, msg))
        return reply_json({"res": 1})

    def gs_receive(self, p):
        (host,) = self.canon(p, "host")
        order, entries, rest = self.drain_chat(self.host_chat[host], lambda it: it[0])
        self.host_chat[host] = rest
        out = [{"uid": s(uid), "msg": s(b",".join(it[1] for it in entries[uid]))} for uid in order]
        return reply_json({"res": 1, "data": b64json(out)})

    def gs_online(self, p):
        (host,) = self.canon(p, "host")
        out = [s(gm) for gm in sorted(self.online)
               if any(self.link.get(u, (None, None))[1] == host for u in self.friends[gm])]
        return reply_json({"res": 1, "data": b64json(out)})

    def pending_msgs(self, uid):
        return any(it[0] == uid for q in self.host_chat.values() for it in q) or \
            any(it[1] == uid for it in self.gm_chat)


# ----------------------------------------------------------------------------------------
# Reply normalisation and format checks
# ----------------------------------------------------------------------------------------

def canon_json(x):
    return json.dumps(x, sort_keys=True, ensure_ascii=False)


def python_layout_ok(text):
    """Whether `text` is exactly what Python 2's json.dumps writes for its own content
    (separators ', ' and ': ', ASCII only), whatever the key order."""
    try:
        obj = json.loads(text, object_pairs_hook=collections.OrderedDict)
    except Exception:
        return False
    return json.dumps(obj) == text


def normalize(reply):
    """(status, content-type, body bytes) -> a comparable, printable form.
    JSON: `error` dropped, base64 fields decoded, lists whose order is free sorted."""
    status, ctype, body = reply
    if status == 500:
        return ("HTTP 500",)
    try:
        text = body.decode("ascii")
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError
    except Exception:
        return ("text", status, ctype, body.decode("utf-8", "replace"))
    obj.pop("error", None)
    out = {}
    for k, v in obj.items():
        if k in ("data", "apply_data", "remove_data") and isinstance(v, str):
            try:
                inner = json.loads(base64.b64decode(v, validate=True).decode("ascii"))
            except Exception:
                out[k] = ["undecodable base64/JSON", v]
                continue
            if isinstance(inner, list):
                inner = sorted(canon_json(x) if not isinstance(x, str) else x for x in inner)
            elif isinstance(inner, dict) and k == "data":
                inner = {g: sorted(canon_json(x) for x in items) if isinstance(items, list) else items
                         for g, items in inner.items()}
            out[k] = inner
        else:
            out[k] = v
    return ("json", status, ctype, canon_json(out))


def format_problems(reply):
    """Layout problems of a JSON reply (outer and base64 inner), [] if none."""
    status, ctype, body = reply
    if status != 200:
        return []
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return ["non-ASCII bytes in the reply body"]
    try:
        obj = json.loads(text)
    except Exception:
        return []
    if not isinstance(obj, dict):
        return []
    problems = []
    if not python_layout_ok(text):
        problems.append("outer JSON is not Python json.dumps layout")
    for k in ("data", "apply_data", "remove_data"):
        if isinstance(obj.get(k), str):
            try:
                inner = base64.b64decode(obj[k], validate=True).decode("ascii")
            except Exception:
                problems.append("%s is not standard base64 of ASCII JSON" % k)
                continue
            if not python_layout_ok(inner):
                problems.append("%s JSON is not Python json.dumps layout" % k)
    return problems


def items_of(norm):
    """The items of a normalized poll reply: ('msg', gm or None, uid, msg) for chat,
    ('apply', uid, [gm, name]), ('remove', uid), ('online', gm)."""
    out = set()
    if norm[0] != "json":
        return out
    obj = json.loads(norm[3])
    for k in ("data", "apply_data", "remove_data"):
        v = obj.get(k)
        if isinstance(v, list):
            for x in v:
                if x[:1] in ("{", "["):  # normalize() wrote containers as canonical JSON
                    x = json.loads(x)
                if isinstance(x, dict):
                    out.add(("msg", None, x.get("uid"), x.get("msg")))
                else:
                    out.add(("remove" if k == "remove_data" else "online", x))
        elif isinstance(v, dict):
            for key, val in v.items():
                if k == "apply_data":
                    out.add(("apply", key, json.dumps(val)))
                else:
                    for x in val if isinstance(val, list) else []:
                        x = json.loads(x)
                        out.add(("msg", key, x.get("uid"), x.get("msg")))
    return out


def canon_text(t):
    return isinstance(t, str) and is_canon(t.encode("utf-8"))


def item_kinds(it, causes):
    """Which deliberate difference explains one item present on one side only."""
    if it[0] == "msg":
        _, gm, uid, msg = it
        if any(not relay_msg_ok(piece.encode("utf-8")) for piece in str(msg).split(",")):
            return {K_MSG}
        if not canon_text(uid) or (gm is not None and not canon_text(gm)):
            return {K_NONCANON}
        ents = {("uid", uid)} | ({("gm", gm)} if gm is not None else set())
        return (causes.of(ents) & {K_REMOVED}) or causes.of(ents)
    if it[0] in ("apply", "remove"):
        uid = it[1]
        gm = json.loads(it[2])[0] if it[0] == "apply" else None
        if not canon_text(uid) or (gm is not None and not canon_text(gm)):
            return {K_NONCANON}
        return (causes.of({("uid", uid)}) & {K_READD}) or causes.of({("uid", uid)})
    if it[0] == "online":
        gm = it[1]
        if not canon_text(gm):
            return {K_NONCANON}
        return (causes.of({("gm", gm)}) & {K_NONCANON}) or causes.of({("gm", gm)})
    return set()


def attribute(kinds, p, n_po, n_pr, causes):
    """The deliberate differences behind a difference the models predicted."""
    if kinds:
        return set(kinds)
    diff = items_of(n_po) ^ items_of(n_pr)
    why = set()
    for it in diff:
        why |= item_kinds(it, causes)
    if not diff:
        ents = set()
        for k, key in (("uid", "uid"), ("gm", "gm_account"), ("host", "host")):
            if key in p and is_utf8(p[key]):
                ents.add((k, s(p[key])))
        why = causes.of(ents)
    return why


# ----------------------------------------------------------------------------------------
# Request generation
# ----------------------------------------------------------------------------------------

def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode()


def enc_std(v):
    return urllib.parse.quote_plus(v, safe="")


def enc_double(v):
    return urllib.parse.quote(urllib.parse.quote(v, safe=""), safe="")


def enc_raw_b64(v):
    # base64 sent as is ('/' and '=' are fine raw in a query value); a '+' would arrive as
    # a space, so only used when there is none.
    return v


class Req:
    def __init__(self, side, action, pairs, category, headers=None, source=None):
        self.source = source
        self.side = side
        self.action = action
        self.pairs = pairs  # [(encoded key, encoded value, or None for a bare key)]
        self.category = category
        self.headers = headers or []

    @property
    def raw(self):
        return "&".join(k if v is None else "%s=%s" % (k, v) for k, v in self.pairs).encode("ascii")

    def target(self):
        return b"/" + self.side.encode() + b"?" + self.raw

    def __str__(self):
        return "GET %s%s%s" % (self.target().decode(), "".join(" [%s: %s]" % h for h in self.headers),
                               " [from %s]" % self.source if self.source else "")


class Gen:
    def __init__(self, rng, orig, relay, edge=True):
        self.edge = edge
        self.rng = rng
        self.o = orig
        self.r = relay
        self.queue = []
        self.edge_n = 0

    def edge_uid(self, prefix):
        self.edge_n += 1
        return prefix + b"%04d" % self.edge_n

    # ---- helpers
    def pick(self, seq):
        return self.rng.choice(list(seq))

    def msg_param(self, text=None):
        text = text if text is not None else self.pick(MSG_TEXTS)
        v = b64(text)
        style = self.rng.random()
        if len(v) > 1500 or style < 0.6:
            return enc_std(v)
        if style < 0.85:
            return enc_double(v)
        if "+" not in v:
            return enc_raw_b64(v)
        return enc_std(v)

    def name_param(self, name):
        style = self.rng.random()
        if style < 0.6:
            return enc_std(name)
        if style < 0.85:
            return enc_double(name)
        return urllib.parse.quote(name, safe="")  # spaces as %20

    def id_param(self, b):
        return urllib.parse.quote_plus(b.decode("latin-1"), safe="")

    def build(self, side, action, params, category):
        """params: [(key, encoded value)]; adds action, shuffles, sometimes repeats a key or
        encodes a key's character, sometimes adds an X-Real-IP header (untrusted: ignored)."""
        pairs = [("action", action)] + list(params)
        if self.rng.random() < 0.5:
            self.rng.shuffle(pairs)
        if self.rng.random() < 0.05 and pairs:
            k, _ = self.pick(pairs)
            pairs.append((k, "ignored%2Bsecond"))  # first value wins
        if self.rng.random() < 0.03 and pairs:
            i = self.rng.randrange(len(pairs))
            k, v = pairs[i]
            j = self.rng.randrange(len(k))
            pairs[i] = (k[:j] + "%%%02X" % ord(k[j]) + k[j + 1:], v)
        if self.rng.random() < 0.05:
            pairs.append(("junk", "x%zz%"))
        if self.rng.random() < 0.05:  # lowercase hex escapes decode the same
            pairs = [(k, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), v)) for k, v in pairs]
        headers = []
        if self.rng.random() < 0.03:
            headers.append(self.pick([("X-Real-IP", "10.9.8.7"), ("X-Forwarded-For", "10.9.8.7, 127.0.0.1")]))
        return Req(side, action, pairs, category, headers)

    def linked(self):
        """Friendships of the universe (edge-case players are left alone)."""
        return [(u, (g, h)) for u, (g, h) in self.r.link.items() if u in UIDS and g in GMS]

    # ---- valid requests
    def v_create(self):
        missing = [g for g in GMS if g not in self.r.names]
        gm = self.pick(missing) if missing and self.rng.random() < 0.8 else self.pick(GMS)
        return self.build("gm", "create", [("gm_account", self.id_param(gm)),
                                           ("gm_name", self.name_param(self.pick(NAMES)))], "valid")

    def v_add(self):
        existing = [g for g in GMS if g in self.r.names]
        gm = self.pick(existing) if existing and self.rng.random() < 0.9 else self.pick(GMS)
        free = [u for u in UIDS if u not in self.r.link]
        uid = self.pick(free) if free and self.rng.random() < 0.75 else self.pick(UIDS)
        host = self.pick(HOSTS)
        old = self.o.remove.get(uid)
        if old is not None and old != host and self.rng.random() < 0.85:
            host = old  # prefer inputs where no deliberate difference applies
        return self.build("gm", "add", [("gm_account", self.id_param(gm)), ("host", self.id_param(host)),
                                        ("uid", self.id_param(uid))], "valid")

    def v_del(self):
        links = self.linked()
        if links and self.rng.random() < 0.75:
            uid, (gm, _) = self.pick(links)
            if self.rng.random() < 0.1:
                gm = self.pick(GMS)
        else:
            uid, gm = self.pick(UIDS), self.pick(GMS)
        if (self.o.pending_msgs(uid) or self.r.pending_msgs(uid)) and self.rng.random() < 0.85:
            return None
        return self.build("gm", "del", [("gm_account", self.id_param(gm)), ("uid", self.id_param(uid))], "valid")

    def v_online(self, action):
        return self.build("gm", action, [("gm_account", self.id_param(self.pick(GMS)))], "valid")

    def pair_for_send(self):
        links = self.linked()
        if links and self.rng.random() < 0.85:
            uid, (gm, _) = self.pick(links)
        else:
            uid, gm = self.pick(UIDS), self.pick(GMS)
        return gm, uid

    def v_gm_send(self, text=None):
        gm, uid = self.pair_for_send()
        return self.build("gm", "send", [("gm_account", self.id_param(gm)), ("uid", self.id_param(uid)),
                                         ("msg", self.msg_param(text))], "valid")

    def v_gs_send(self, text=None):
        _, uid = self.pair_for_send()
        return self.build("gs", "send", [("uid", self.id_param(uid)), ("msg", self.msg_param(text))], "valid")

    def v_host_action(self, action):
        return self.build("gs", action, [("host", self.id_param(self.pick(HOSTS)))], "valid")

    def burst(self):
        links = self.linked()
        if not links:
            return None
        uid, (gm, _) = self.pick(links)
        n = self.rng.randint(11, 14)
        side = self.pick(["gm", "gs"])
        reqs = []
        for i in range(n):
            text = "%s #%d" % (self.pick(["消息", "msg", "burst"]), i)
            if side == "gm":
                reqs.append(self.build("gm", "send", [("gm_account", self.id_param(gm)), ("uid", self.id_param(uid)),
                                                      ("msg", self.msg_param(text))], "valid"))
            else:
                reqs.append(self.build("gs", "send", [("uid", self.id_param(uid)), ("msg", self.msg_param(text))], "valid"))
        return reqs

    # ---- invalid or edge requests
    def i_missing(self):
        side = self.pick(["gm", "gs"])
        table = GM_ACTIONS if side == "gm" else GS_ACTIONS
        action = self.pick([a for a in table if table[a]])
        keys = list(table[action])
        values = {"gm_account": self.id_param(self.pick(GMS)), "host": self.id_param(self.pick(HOSTS)),
                  "uid": self.id_param(self.pick(UIDS)), "msg": self.msg_param(),
                  "gm_name": self.name_param(self.pick(NAMES))}
        if self.rng.random() < 0.1:
            return Req(side, "", [], "missing")  # empty query
        if self.rng.random() < 0.15:
            # no action at all
            return Req(side, "", [(k, values[k]) for k in keys], "missing")
        drop = self.pick(keys)
        params = [(k, values[k]) for k in keys if k != drop]
        return self.build(side, action, params, "missing")

    def phantoms(self, kind):
        if kind == "gm":
            return [g for g in self.o.names if not is_canon(g)]
        if kind == "uid":
            return [u for u in self.o.uid_gm if not is_canon(u)]
        return [h for h in set(self.o.uid_host.values()) | set(self.o.remove.values()) if not is_canon(h)]

    def noncanon(self, kind):
        pool = NONCANON_HOSTS if kind == "host" else NONCANON_IDS
        ph = self.phantoms(kind)
        if ph and self.rng.random() < 0.5:
            return self.pick(ph)
        return self.pick(pool)

    def i_noncanon(self):
        choice = self.pick(["create", "add", "add", "add", "del", "online", "offline", "send", "gs_send",
                            "relation", "receive", "gs_online"])
        P = self.id_param
        if choice == "create":
            return self.build("gm", "create", [("gm_account", P(self.noncanon("gm"))),
                                               ("gm_name", self.name_param(self.pick(NAMES)))], "noncanon")
        if choice == "add":
            which = self.pick(["gm_account", "host", "uid"])
            existing = [g for g in GMS if g in self.r.names] or GMS
            gm = self.noncanon("gm") if which == "gm_account" else self.pick(existing)
            host = self.noncanon("host") if which == "host" else self.pick(HOSTS[:2])  # < 1000
            uid = self.noncanon("uid") if which == "uid" else self.pick(SPARE_UIDS)
            return self.build("gm", "add", [("gm_account", P(gm)), ("host", P(host)), ("uid", P(uid))], "noncanon")
        if choice == "del":
            ph = self.phantoms("uid")
            if ph and self.rng.random() < 0.7:
                uid = self.pick(ph)
                gm = self.o.uid_gm[uid]
                if is_canon(gm) and self.rng.random() < 0.5:
                    uid = self.noncanon("uid")
            else:
                gm, uid = self.noncanon("gm"), self.pick(UIDS)
            return self.build("gm", "del", [("gm_account", P(gm)), ("uid", P(uid))], "noncanon")
        if choice in ("online", "offline"):
            return self.build("gm", choice, [("gm_account", P(self.noncanon("gm")))], "noncanon")
        if choice == "send":
            ph = self.phantoms("uid")
            if ph and self.rng.random() < 0.7:
                uid = self.pick(ph)
                gm = self.o.uid_gm[uid]
            else:
                gm, uid = self.noncanon("gm"), self.pick(UIDS)
            return self.build("gm", "send", [("gm_account", P(gm)), ("uid", P(uid)), ("msg", self.msg_param())],
                              "noncanon")
        if choice == "gs_send":
            ph = self.phantoms("uid")
            uid = self.pick(ph) if ph and self.rng.random() < 0.7 else self.noncanon("uid")
            return self.build("gs", "send", [("uid", P(uid)), ("msg", self.msg_param())], "noncanon")
        action = {"relation": "relation", "receive": "receive", "gs_online": "online"}[choice]
        return self.build("gs", action, [("host", P(self.noncanon("host")))], "noncanon")

    def i_badmsg(self):
        links = self.linked()
        if not links:
            return None
        uid, (gm, _) = self.pick(links)
        bad = self.pick([
            "", enc_std("aGk"), enc_std("aGl="), enc_std("_-8="), enc_std("/w=="),
            enc_std(b64("x" * 501)), enc_std(b64("😀" * 501)), enc_std(b64("中") + "\n"), "%25zz",
            # a raw '+' arrives as a space
            b64("在吗？") if "+" in b64("在吗？") else "a+b=",
        ])
        if self.rng.random() < 0.5:
            return self.build("gm", "send", [("gm_account", self.id_param(gm)), ("uid", self.id_param(uid)),
                                             ("msg", bad)], "badmsg")
        return self.build("gs", "send", [("uid", self.id_param(uid)), ("msg", bad)], "badmsg")

    def i_badname(self):
        gm = self.pick(ODD_GMS)
        r = self.rng.random()
        if r < 0.5:
            name = self.pick(["", "x" * 65, "名" * 65, "😀" * 65, "%FF%FE", "%E5%BC"])
            enc = name if name.startswith("%") else enc_std(name)
            return self.build("gm", "create", [("gm_account", self.id_param(gm)), ("gm_name", enc)], "badname")
        if r < 0.7:
            return self.build("gm", "create", [("gm_account", self.id_param(gm)),
                                               ("gm_name", self.name_param(self.pick(NAMES)))], "badname")
        return self.build("gm", self.pick(["online", "offline"]), [("gm_account", self.id_param(gm))], "badname")

    def i_unknown(self):
        side = self.pick(["gm", "gs"])
        action = self.pick(["foo", "", "Create", "%E5%BC%A0", "relation" if side == "gm" else "create",
                            "del%20", "send%00"])
        return self.build(side, action, [("host", "7")], "unknown-action")

    def i_refused(self):
        """From 127.0.0.2: outside both allowlists; an X-Real-IP from an untrusted peer
        must not help."""
        req = self.pick([lambda: self.build("gm", "receive", [], "refused"),
                         lambda: self.v_host_action("relation"), self.v_add, self.v_gs_send])()
        req.category, req.source = "refused", "127.0.0.2"
        if self.rng.random() < 0.3:
            req.headers = [("X-Real-IP", "127.0.0.1")]
        return req

    def i_edge(self):
        """Inputs LEGACY_PROTOCOL.md lists no difference for, on the edge GM/host/players:
        role replies Python reads as code == 1, bare keys, more than 64 pairs."""
        seq = []
        P = self.id_param
        if not self.o.names.get(EDGE_GM):
            seq.append(Req("gm", "create", [("action", "create"), ("gm_account", P(EDGE_GM)),
                                            ("gm_name", enc_std("边缘 edge"))], "edge"))
        kind = self.pick(["role", "bare_dup", "bare_msg", "many_pairs"])
        if kind == "role":
            prefix, reply = self.pick(EDGE_ROLE_REPLIES)
            uid = self.edge_uid(prefix)
            ROLE_REPLIES[uid.decode()] = reply  # the stub reads this table live
            seq.append(Req("gm", "add", [("action", "add"), ("gm_account", P(EDGE_GM)), ("host", P(EDGE_HOST)),
                                         ("uid", P(uid))], "edge"))
        elif kind == "bare_dup":
            seq.append(Req("gm", "add", [("action", "add"), ("gm_account", P(EDGE_GM)), ("host", P(EDGE_HOST)),
                                         ("uid", None), ("uid", P(self.edge_uid(b"7213")))], "edge"))
        elif kind == "bare_msg":
            uid = P(self.edge_uid(b"7214"))
            seq.append(Req("gm", "add", [("action", "add"), ("gm_account", P(EDGE_GM)), ("host", P(EDGE_HOST)),
                                         ("uid", uid)], "edge"))
            seq.append(Req("gm", "send", [("action", "send"), ("gm_account", P(EDGE_GM)), ("uid", uid),
                                          ("msg", None)], "edge"))
        else:
            junk = [("p%d" % i, "1") for i in range(64)]
            seq.append(Req("gs", "online", junk + [("action", "online"), ("host", P(self.pick(HOSTS)))], "edge"))
        return seq

    def next(self):
        if self.queue:
            return self.queue.pop(0)
        for _ in range(50):
            req = self._one()
            if isinstance(req, list):
                self.queue = req[1:]
                return req[0]
            if req is not None:
                return req
        return self.v_host_action("relation")

    def _one(self):
        rng = self.rng
        if rng.random() < 0.07:
            kind = rng.choice(["missing", "noncanon", "noncanon", "badmsg", "badname", "unknown", "refused"]
                              + (["edge"] if self.edge else []))
            return getattr(self, "i_" + kind)()
        if rng.random() < 0.025:
            return self.burst()
        missing = sum(1 for g in GMS if g not in self.r.names)
        weights = [
            ("create", 4 + 40 * missing), ("add", 14), ("del", 7), ("online", 4), ("offline", 4),
            ("gm_send", 17), ("gm_receive", 8), ("relation", 10), ("gs_send", 14), ("gs_receive", 10),
            ("gs_online", 5),
        ]
        total = sum(w for _, w in weights)
        x = rng.uniform(0, total)
        for name, w in weights:
            x -= w
            if x <= 0:
                break
        if name == "create":
            return self.v_create()
        if name == "add":
            return self.v_add()
        if name == "del":
            return self.v_del()
        if name in ("online", "offline"):
            return self.v_online(name)
        if name == "gm_send":
            return self.v_gm_send()
        if name == "gs_send":
            return self.v_gs_send()
        if name == "gm_receive":
            return self.build("gm", "receive", [], "valid")
        return self.v_host_action({"relation": "relation", "gs_receive": "receive", "gs_online": "online"}[name])


# ----------------------------------------------------------------------------------------
# Attribution of model-predicted differences
# ----------------------------------------------------------------------------------------

class Causes:
    def __init__(self):
        self.by_entity = collections.defaultdict(set)

    def add(self, kind, ident, cause):
        self.by_entity[(kind, s(ident) if isinstance(ident, bytes) else ident)].add(cause)

    def of(self, ents):
        out = set()
        for e in ents:
            out |= self.by_entity.get(e, set())
        return out


def request_kinds(side, p):
    """Deliberate differences that this request triggers by itself."""
    kinds = set()
    table = GM_ACTIONS if side == "gm" else GS_ACTIONS
    action = p.get("action")
    if action is None:
        return {K_MISSING}
    key = action.decode("latin-1")
    if key not in table:
        return kinds
    required = table[key]
    if any(k not in p for k in required):
        kinds.add(K_MISSING)
    for k in ID_KEYS:
        if k in required and k in p and not is_canon(p[k]):
            kinds.add(K_NONCANON)
    if key == "create" and "gm_name" in p:
        name = unquote(p["gm_name"])
        if not name:
            kinds.add(K_EMPTY_NAME)
        elif not relay_name_ok(name):
            kinds.add(K_NAME_RULES)
    if key == "send" and "msg" in p and not relay_msg_ok(unquote(p["msg"])):
        kinds.add(K_MSG)
    if key == "add" and all(k in p for k in required) and all(is_canon(p[k]) for k in required) \
            and int(p["host"]) >= 1000 and role_answer(p["uid"].decode("latin-1")) == "broken":
        kinds.add(K_ROLE)
    return kinds


# ----------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s" % (what, proc.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not listen on %d" % (what, port))


def http_get(port, target, headers=(), timeout=20, source=None):
    """One raw HTTP/1.1 GET (Connection: close); returns (status, content-type, body).
    `source`: local address to connect from (e.g. 127.0.0.2, refused by both allowlists)."""
    req = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\nConnection: close\r\n"
    for k, v in headers:
        req += ("%s: %s\r\n" % (k, v)).encode("latin-1")
    req += b"\r\n"
    src = (source, 0) if source else None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=src) as sock:
        sock.sendall(req)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        hdrs.setdefault(k.strip().lower().decode("latin-1"), v.strip().decode("latin-1"))
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    elif "content-length" in hdrs:
        body = body[: int(hdrs["content-length"])]
    return (status, hdrs.get("content-type"), body)


class RoleHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q = urllib.parse.urlsplit(self.path).query
        uid = urllib.parse.parse_qs(q, keep_blank_values=True).get("uid", [""])[0]
        status, body = ROLE_REPLIES.get(uid, DEFAULT_ROLE_REPLY)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Stack:
    """Everything this run starts; `close()` stops it all (only what it started)."""

    def __init__(self, tmp, relay_bin, relay_env=None):
        self.relay_env = relay_env or {}
        self.tmp = tmp
        self.relay_bin = relay_bin
        self.procs = []
        self.role_server = None

    def spawn(self, name, argv, env=None):
        log = open(os.path.join(self.tmp, name + ".log"), "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=self.tmp, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def redis(self, name):
        port = free_port()
        d = os.path.join(self.tmp, name)
        os.makedirs(d)
        proc = self.spawn(name, ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", d, "--save", "", "--appendonly", "no", "--daemonize", "no",
                                 "--protected-mode", "yes"])
        wait_port(port, proc, name)
        return port

    def start(self):
        self.redis_orig = self.redis("redis-orig")
        self.redis_relay = self.redis("redis-relay")

        self.nats_port = free_port()
        sd = os.path.join(self.tmp, "nats")
        os.makedirs(sd)
        # Pinned as in the shipped configs: unset, nats-server takes 75% of the free disk,
        # and the relay's three streams reserve 10 GiB each up front.
        conf = os.path.join(self.tmp, "nats.conf")
        with open(conf, "w") as f:
            f.write("jetstream {\n  max_file_store: 40GB\n}\n")
        nats = self.spawn("nats", [os.path.join(REPO, "var/venv/bin/nats-server"), "-c", conf,
                                   "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd", sd])
        wait_port(self.nats_port, nats, "nats-server")

        self.role_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RoleHandler)
        self.role_server.daemon_threads = True
        role_port = self.role_server.server_address[1]
        threading.Thread(target=self.role_server.serve_forever, daemon=True).start()

        self.orig_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GM_RELAY_", "PYTHON"))}
        env.update({
            "PYENV_VERSION": "2.7.18",
            "PYTHONPATH": os.path.join(REPO, "var/py2-redis"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "GM_ORIG_REDIS_URL": "redis://127.0.0.1:%d/0" % self.redis_orig,
            "GM_ORIG_ROLE_INFO_URL": "http://127.0.0.1:%d/role?uid=%%s&hostnum=%%s" % role_port,
        })
        orig = self.spawn("original", ["python2", os.path.join(HERE, "original_app.py"), str(self.orig_port)], env)
        wait_port(self.orig_port, orig, "original app")

        self.relay_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GM_RELAY_")}
        env.update({
            "GM_RELAY_LISTEN": "127.0.0.1:%d" % self.relay_port,
            "GM_RELAY_NATS_URL": "nats://127.0.0.1:%d" % self.nats_port,
            "GM_RELAY_REDIS_URL": "redis://127.0.0.1:%d" % self.redis_relay,
            "GM_RELAY_RATE_GM_PER_S": "0",
            "GM_RELAY_RATE_PLAYER_PER_S": "0",
            "GM_RELAY_RATE_IP_PER_S": "0",
            "GM_RELAY_LOG_FORMAT": "pretty",
            "GM_RELAY_ROLE_INFO_URL": "http://127.0.0.1:%d/role?uid={uid}&hostnum={host}" % role_port,
        })
        env.update(self.relay_env)
        relay = self.spawn("gm-relay", [self.relay_bin, "serve"], env)
        wait_port(self.relay_port, relay, "gm-relay")
        deadline = time.time() + 30
        while True:
            try:
                if http_get(self.relay_port, b"/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if relay.poll() is not None or time.time() > deadline:
                raise RuntimeError("gm-relay not ready (log: %s)" % os.path.join(self.tmp, "gm-relay.log"))
            time.sleep(0.1)

    def alive(self):
        return [name for name, p in self.procs if p.poll() is not None]

    def close(self):
        if self.role_server is not None:
            self.role_server.shutdown()
            self.role_server.server_close()
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# ----------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------

def show(norm):
    return " | ".join(str(x) for x in norm)


def main():
    # SIGTERM/SIGHUP end the run through the `finally` that stops every process started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=20, help="unexpected mismatches printed in full")
    ap.add_argument("--no-build", action="store_true", help="skip `cargo build`")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument("--trace", action="store_true", help="print every request and both replies")
    ap.add_argument("--relay-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for gm-relay (e.g. to check that the tool notices a change)")
    ap.add_argument("--no-edge", action="store_true",
                    help="leave out the 'edge' cases (bare keys, >64 pairs, role replies like 1.0/true)")
    args = ap.parse_args()

    if not args.no_build:
        subprocess.run(["cargo", "build", "--quiet"], cwd=REPO, check=True)
    relay_bin = os.path.join(REPO, "target/debug/gm-relay")

    tmp = tempfile.mkdtemp(prefix="gm-conformance-")
    stack = Stack(tmp, relay_bin, dict(kv.split("=", 1) for kv in args.relay_env))
    unexpected_count = 0
    try:
        try:
            stack.start()
        except Exception as e:
            print("set-up failed: %s (logs in %s)" % (e, tmp), file=sys.stderr)
            args.keep_tmp = True
            return 2
        unexpected_count = replay(args, stack)
        dead = stack.alive()
        if dead:
            print("processes that exited during the run: %s (logs in %s)" % (", ".join(dead), tmp))
            args.keep_tmp = True
            unexpected_count += 1
        if unexpected_count:
            args.keep_tmp = True
    finally:
        stack.close()
        if args.keep_tmp:
            print("logs and data kept in %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if unexpected_count else 0


def replay(args, stack):
    rng = random.Random(args.seed)
    orig, relay = OrigWorld(), RelayWorld()
    gen = Gen(rng, orig, relay, edge=not args.no_edge)
    causes = Causes()

    exact = 0
    allowed = collections.Counter()
    categories = collections.Counter()
    unexpected = []
    drift = []  # the original did not do what its model says: a bug of this tool
    relay_like_orig = []  # the doc predicts a difference, the relay answered as the original
    coverage = collections.Counter()  # what the exact matches exercised
    started = time.time()

    for seq in range(1, args.requests + 1):
        req = gen.next()
        categories[req.category] += 1
        target = req.target()
        p = parse_query(req.raw)
        kinds = request_kinds(req.side, p)

        # Predictions: the models advance by their own predictions, never by the replies.
        # Causes are noted first (they depend on the state before the request).
        uid = p.get("uid", b"")
        register_causes_pre(causes, req.side, p, dict(orig.remove),
                            (orig.pending_msgs(uid), relay.pending_msgs(uid)), orig.uid_gm.get(uid))
        if req.source:
            pred_o = pred_r = (200, "text/html", ("%s has no access to the website" % req.source).encode())
        else:
            pred_o = orig.handle(req.side, p)
            pred_r = relay.handle(req.side, p)
        orig_ok = pred_o[0] == 200 and b'"res": 1' in pred_o[2]
        register_causes_post(causes, req.side, p, kinds, orig_ok)

        replies = []
        for port in (stack.orig_port, stack.relay_port):
            try:
                replies.append(http_get(port, target, req.headers, source=req.source))
            except Exception as e:
                replies.append((-1, None, ("no reply: %r" % e).encode()))
        act_o, act_r = replies

        n_ao, n_ar = normalize(act_o), normalize(act_r)
        n_po, n_pr = normalize(pred_o), normalize(pred_r)
        fmt = format_problems(act_r)

        if args.trace:
            print("#%d %s %s\n   orig : %s\n   relay: %s" % (seq, req.category, req, show(n_ao), show(n_ar)))

        if n_ao != n_po:
            drift.append((seq, req, n_po, n_ao))

        if n_ao == n_ar and not fmt:
            exact += 1
            note_coverage(coverage, req, n_ar)
            if n_po != n_pr:
                relay_like_orig.append((seq, req, n_pr, n_ar))
            continue
        note = []
        if n_po != n_pr and n_ao == n_po and n_ar == n_pr and not fmt:
            why = attribute(kinds, p, n_po, n_pr, causes)
            if why:
                for k in why:
                    allowed[k] += 1
                continue
            note.append("the models differ here but no deliberate difference explains it (tool bug?)")
        elif n_po != n_pr:
            note.append("a deliberate difference applies, but the relay's reply is not the documented one")
        if n_ar != n_pr:
            note.append("expected from the relay: %s" % show(n_pr))
        role_reply = ROLE_REPLIES.get(p.get("uid", b"").decode("latin-1")) if req.action == "add" else None
        if role_reply:
            note.append("role service replied: HTTP %d %s" % (role_reply[0], role_reply[1].decode()))
        if fmt:
            note.append("reply layout: " + "; ".join(fmt))
        unexpected.append((seq, req, n_ao, n_ar, "\n      ".join(note)))

    elapsed = time.time() - started
    total = args.requests
    print("=" * 78)
    print("gm-relay conformance: %d requests, seed %d, %.1fs" % (total, args.seed, elapsed))
    print("request mix: %s" % ", ".join("%s %d" % kv for kv in sorted(categories.items())))
    print("exact matches:            %d" % exact)
    print("    of which: %s" % ", ".join("%s %d" % kv for kv in sorted(coverage.items())))
    print("allowed differences:      %d requests (a request may count under several kinds)"
          % (total - exact - len(unexpected)))
    for k, n in allowed.most_common():
        print("    %5d  %s" % (n, k))
    print("unexpected mismatches:    %d" % len(unexpected))
    for seq, req, n_ao, n_ar, note in unexpected[: args.show]:
        print("-" * 78)
        print("#%d (%s) %s" % (seq, req.category, req))
        print("   original: %s" % show(n_ao))
        print("   relay   : %s" % show(n_ar))
        if note:
            print("   note    : %s" % note)
    if relay_like_orig:
        print("-" * 78)
        print("NOTE: %d times the relay answered like the original where LEGACY_PROTOCOL.md says it "
              "differs (first 5):" % len(relay_like_orig))
        for seq, req, n_pr, n_ar in relay_like_orig[:5]:
            print("#%d %s\n   documented: %s\n   relay     : %s" % (seq, req, show(n_pr), show(n_ar)))
    if drift:
        print("-" * 78)
        print("TOOL WARNING: the original app differed from its model %d times (first 5):" % len(drift))
        for seq, req, n_po, n_ao in drift[:5]:
            print("#%d %s\n   model : %s\n   actual: %s" % (seq, req, show(n_po), show(n_ao)))
    print("=" * 78)
    return len(unexpected) + (1 if drift else 0)


def note_coverage(coverage, req, norm):
    if norm[0] != "json":
        coverage["404/text"] += 1
        return
    obj = json.loads(norm[3])
    if obj.get("res") == 0:
        coverage["errors"] += 1
        return
    items = items_of(norm)
    if not items:
        return
    label = {"relation": "relation", "receive": "%s receive" % req.side, "online": "gs online"}.get(req.action)
    if label and req.side == "gs" or req.action == "receive":
        coverage["non-empty %s" % label] += 1
    if any(it[0] == "msg" and str(it[-1]).count(",") == 9 for it in items):
        coverage["10-message batches"] += 1


def is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def register_causes_pre(causes, side, p, pre_remove, pre_pending, orig_uid_gm):
    action = p.get("action", b"").decode("latin-1")
    uid, gm, host = p.get("uid"), p.get("gm_account"), p.get("host")
    if side == "gm" and action == "del" and uid is not None and (pre_pending[0] or pre_pending[1]):
        causes.add("uid", uid, K_REMOVED)
        for g in (gm, orig_uid_gm):
            if g is not None and is_utf8(g):
                causes.add("gm", g, K_REMOVED)
    if side == "gm" and action == "add" and uid is not None and host is not None:
        old = pre_remove.get(uid)
        if old is not None and old != host:
            causes.add("uid", uid, K_READD)


def register_causes_post(causes, side, p, kinds, orig_ok):
    if not orig_ok:
        return
    uid, gm, host = p.get("uid"), p.get("gm_account"), p.get("host")
    for k in kinds & {K_NONCANON, K_MSG, K_EMPTY_NAME, K_NAME_RULES}:
        for kind, ident in (("uid", uid), ("gm", gm), ("host", host)):
            if ident is not None and is_utf8(ident):
                causes.add(kind, ident, k)


if __name__ == "__main__":
    sys.exit(main())
