"""A DNS server on loopback for the tests: answers TXT questions from a dict (dnspython's messages)."""

import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class TxtServer:
    def __init__(self, records: dict[str, list[str]]):
        self.records = records
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self._stop.is_set():
            try:
                wire, client = self.socket.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            question = query.question[0]
            texts = self.records.get(question.name.to_text().rstrip(".")) if question.rdtype == dns.rdatatype.TXT else None
            if texts:
                response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT",
                                                                [f'"{text}"' for text in texts]))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.socket.sendto(response.to_wire(), client)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.socket.close()
