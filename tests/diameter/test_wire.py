"""Wire check: Wireshark's Diameter dissector reads what we send without complaint.

We record both directions of a real exchange between two PeerConnections (CER/CEA,
the three CCR/CCA operations, error answers with Failed-AVP and the E bit,
DWR/DWA, DPR/DPA), write them as one TCP conversation into a pcap (our own
IPv4/TCP headers, handshake included, so no capture privileges or timing are
involved), and let tshark dissect it. No '[Malformed Packet]', no expert info of
severity warning or error.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import DiameterError, decode
from extrabalance.diameter.peer import LocalIdentity, PeerConnection, RequestReceived, Role

from .helpers import sample_ccr

pytestmark = pytest.mark.wire

DIAMETER_PORT = 3868
CLIENT_PORT = 40000
CLIENT_IP = bytes([127, 0, 0, 1])
SERVER_IP = bytes([127, 0, 0, 2])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
              flags: int, payload: bytes, ident: int) -> bytes:
    tcp_no_sum = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp_no_sum) + len(payload))
    tcp_sum = _checksum(pseudo + tcp_no_sum + payload)
    tcp = tcp_no_sum[:16] + struct.pack("!H", tcp_sum) + tcp_no_sum[18:]
    total = 20 + len(tcp) + len(payload)
    ip_no_sum = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, 6, 0, src, dst)
    ip = ip_no_sum[:10] + struct.pack("!H", _checksum(ip_no_sum)) + ip_no_sum[12:]
    return ip + tcp + payload


def write_pcap(path: Path, segments: list[tuple[bool, bytes]]) -> None:
    """segments: (from_client, payload) in order, as one TCP conversation."""
    syn, ack_flag, psh, fin = 0x02, 0x10, 0x08, 0x01
    c_seq, s_seq = 1000, 5000
    packets: list[bytes] = []
    ident = 1

    def add(from_client: bool, flags: int, payload: bytes = b"") -> None:
        nonlocal c_seq, s_seq, ident
        if from_client:
            pkt = _ipv4_tcp(CLIENT_IP, SERVER_IP, CLIENT_PORT, DIAMETER_PORT, c_seq, s_seq,
                            flags, payload, ident)
            c_seq += len(payload) + (1 if flags & (syn | fin) else 0)
        else:
            pkt = _ipv4_tcp(SERVER_IP, CLIENT_IP, DIAMETER_PORT, CLIENT_PORT, s_seq, c_seq,
                            flags, payload, ident)
            s_seq += len(payload) + (1 if flags & (syn | fin) else 0)
        ident += 1
        packets.append(pkt)

    # handshake (SYN carries no ACK number)
    packets.append(_ipv4_tcp(CLIENT_IP, SERVER_IP, CLIENT_PORT, DIAMETER_PORT, c_seq, 0, syn,
                             b"", 0))
    c_seq += 1
    add(False, syn | ack_flag)
    add(True, ack_flag)
    for from_client, payload in segments:
        add(from_client, psh | ack_flag, payload)
        add(not from_client, ack_flag)
    add(True, fin | ack_flag)
    add(False, fin | ack_flag)
    add(True, ack_flag)

    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)]  # LINKTYPE_RAW
    for i, pkt in enumerate(packets):
        out.append(struct.pack("<IIII", 1_764_000_000 + i, 0, len(pkt), len(pkt)) + pkt)
    path.write_bytes(b"".join(out))


def record_exchange() -> list[tuple[bool, bytes]]:
    node = LocalIdentity("eb.node.example", "node.example", origin_state_id=1)
    in_a = LocalIdentity("in-a.operator.example", "operator.example", origin_state_id=2)
    client = PeerConnection(node, Role.INITIATOR, allowed_peers={in_a.origin_host})
    server = PeerConnection(in_a, Role.RESPONDER, allowed_peers={node.origin_host})
    segments: list[tuple[bool, bytes]] = []

    def pump(now: float = 0.0) -> None:
        for _ in range(10):
            a, b = client.data_to_send(), server.data_to_send()
            if not a and not b:
                return
            if a:
                segments.append((True, a))
                server.data_received(a, now)
            if b:
                segments.append((False, b))
                client.data_received(b, now)

    def serve(now: float = 0.0) -> None:
        for ev in server.events():
            if isinstance(ev, RequestReceived):
                msg = ev.message
                try:
                    ccr = gy.parse_ccr(msg)
                except DiameterError as err:
                    server.send_answer(codec.error_answer(err, in_a.origin_host,
                                                          in_a.origin_realm, msg))
                    continue
                granted = ccr.requested_minor if ccr.requested_action == gy.DIRECT_DEBITING \
                    else None
                cbr = gy.ENOUGH_CREDIT if ccr.requested_action == gy.CHECK_BALANCE else None
                server.send_answer(gy.build_cca(
                    msg, in_a.origin_host, in_a.origin_realm, 2001, granted_minor=granted,
                    check_balance_result=cbr, currency_numeric=818, currency_exponent=2,
                    event_timestamp=3_973_000_100))

    client.start(0.0)
    client.connection_made(0.0)
    server.connection_made(0.0)
    pump()
    for i, action in enumerate([gy.REFUND_ACCOUNT, gy.DIRECT_DEBITING, gy.CHECK_BALANCE]):
        client.send_request(sample_ccr(requested_action=action,
                                       session_id=f"eb.node.example;1;{i}"), i, 0.0, 5.0)
        pump()
        serve()
        pump()
    # out-of-balance CCR with MSCC, and the auto-advance answer
    client.send_request(sample_ccr(has_mscc=True, request_type=gy.INITIAL_REQUEST,
                                   requested_action=None), "mscc", 0.0, 5.0)
    pump()
    for ev in server.events():
        if isinstance(ev, RequestReceived):
            server.send_answer(gy.build_cca(ev.message, in_a.origin_host, in_a.origin_realm,
                                            2001, granted_minor=500, currency_numeric=818,
                                            currency_exponent=2, event_timestamp=3_973_000_100))
    pump()
    # error answers: missing Subscription-Id (5005 + Failed-AVP), a command we do not serve (ACR: 3001, E)
    no_sub = sample_ccr()._replace(avps=tuple(a for a in sample_ccr().avps if a.code != 443))
    client.send_request(no_sub, "5005", 0.0, 5.0)
    pump()
    serve()
    pump()
    client.send_request(sample_ccr()._replace(command_code=271), "3001", 0.0, 5.0)
    pump()
    # watchdog, then disconnect
    t = 0.0
    for _ in range(20):  # stale request deadlines first, then Tw
        t = client.next_timer() or t
        client.handle_timer(t)
        if client._out:
            break
    pump(t)
    client.close(t)
    pump(t)
    kinds = [decode(f).command_code for _, data in segments for f in codec.Framer().feed(data)]
    assert {257, 271, 272, 280, 282} <= set(kinds)
    return segments


needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None,
    reason="tshark not installed: cannot dissect the capture (apt-get install tshark)")


def tshark_problems(pcap: Path) -> tuple[str, list[str]]:
    """(verbose dissection, problems): malformed packets and warning/error expert infos."""
    base = ["tshark", "-n", "-r", str(pcap), "-d", f"tcp.port=={DIAMETER_PORT},diameter"]
    verbose = subprocess.run([*base, "-V"], check=False, capture_output=True, text=True,
                             timeout=60)
    assert verbose.returncode == 0, verbose.stderr
    expert = subprocess.run([*base, "-2", "-q", "-z", "expert,warn"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert expert.returncode == 0, expert.stderr
    problems = []
    if "Malformed Packet" in verbose.stdout:
        problems.append("Malformed Packet")
    # "-z expert,warn" prints a "Warns (n)" / "Errors (n)" table only when there are any.
    problems += [line for line in expert.stdout.splitlines()
                 if line.startswith(("Warns (", "Errors (")) or "Malformed" in line]
    return verbose.stdout, problems


@needs_tshark
def test_tshark_dissects_our_traffic_cleanly(tmp_path: Path) -> None:
    pcap = tmp_path / "diameter.pcap"
    write_pcap(pcap, record_exchange())
    text, problems = tshark_problems(pcap)
    assert "Diameter Protocol" in text
    assert "Command Code: Credit-Control (272)" in text
    assert "Value-Digits: 1000" in text
    assert "Result-Code: DIAMETER_MISSING_AVP (5005)" in text
    assert not problems, problems


@needs_tshark
def test_the_wire_check_can_fail(tmp_path: Path) -> None:
    # An empty Grouped AVP draws a Wireshark warning: the check above would see it.
    broken = sample_ccr()._replace(avps=(*sample_ccr().avps, codec.avp(443, ())))
    pcap = tmp_path / "broken.pcap"
    write_pcap(pcap, [(True, codec.encode(broken))])
    _, problems = tshark_problems(pcap)
    assert problems


def expert_lines(pcap: Path, severity: str = "warn") -> list[str]:
    """The summary lines of tshark's expert table at `severity` and above."""
    base = ["tshark", "-n", "-r", str(pcap), "-d", f"tcp.port=={DIAMETER_PORT},diameter"]
    out = subprocess.run([*base, "-2", "-q", "-z", f"expert,{severity}"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines()
            if line.strip() and line.strip()[0].isdigit()]


def _avp_positions(buf: bytes, pos: int, end: int, out: list[int]) -> list[int]:
    grouped = {437, 413, 445, 443, 456}
    while pos + 8 <= end:
        code, word = struct.unpack_from(">II", buf, pos)
        length = word & 0xFFFFFF
        out.append(pos)
        if code in grouped:
            _avp_positions(buf, pos + 8, pos + length, out)
        pos += length + (-length & 3)
    return out


def length_error_answers() -> list[bytes]:
    """Issue 16: every single-AVP length corruption of a CCR (±1, ±4, ±8 on each AVP,
    nested ones included) that the decoder answers 5014, and the answer we send."""
    base = codec.encode(sample_ccr(requested_action=gy.REFUND_ACCOUNT))
    answers = []
    for pos in _avp_positions(base, codec.HEADER_BYTES, len(base), []):
        for delta in (1, -1, 4, -4, 8, -8):
            raw = bytearray(base)
            word = struct.unpack_from(">I", raw, pos + 4)[0]
            struct.pack_into(">I", raw, pos + 4, (word & 0xFF000000) | ((word & 0xFFFFFF) + delta))
            try:
                codec.decode(bytes(raw))
            except DiameterError as err:
                if err.result_code == 5014:
                    answers.append(codec.encode(codec.error_answer(
                        err, "eb.node.example", "node.example")))
    return answers


def test_a_length_error_answer_carries_a_well_formed_failed_avp() -> None:
    """RFC 6733 §7.1.5 / §7.5: the Failed-AVP of a 5014 is a stand-in of the offending
    AVP's code and minimum length (or the whole children of its Grouped AVP), which
    our own strict decoder reads back without a fault."""
    answers = length_error_answers()
    assert len(answers) > 40
    for data in answers:
        failed = decode(data).first(279)
        assert failed is not None
        for inner in failed.value:
            raw = codec.encode_avp(inner)
            # The strict decoder (no leniency, as for a request) reads it back whole.
            assert codec._decode_avps(raw, 0, len(raw), 0, None) == [inner], inner


@needs_tshark
def test_tshark_reads_every_length_error_answer_without_a_malformation(tmp_path: Path) -> None:
    """The conformance prober's case (a CC-Money claiming more bytes than its
    Requested-Service-Unit holds: "Malformed: Wrong AVP(413) length") and every other
    single length corruption: tshark finds nothing malformed in our answers. Its only
    warning left is for an AVP code it does not know, read where a wrong length made
    the decoder look (the bytes the peer sent, reported as RFC 6733 §7.5 asks)."""
    pcap = tmp_path / "answers.pcap"
    write_pcap(pcap, [(False, data) for data in length_error_answers()])
    lines = expert_lines(pcap)
    bad = [line for line in lines if "Unknown AVP" not in line]
    assert not bad, bad
    text, _ = tshark_problems(pcap)
    assert "Malformed Packet" not in text
