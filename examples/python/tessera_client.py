"""A small Tessera client for Python, over stubs generated from the proto.

Generate the stubs (grpcio-tools, from PyPI) next to this file:

    python -m grpc_tools.protoc -I ../../proto --python_out=. --grpc_python_out=. \
        ../../proto/tessera/v1/broker.proto

then:

    client = Client.from_env()        # TESSERA_BROKER, TESSERA_CA_FILE, TESSERA_TOKEN_FILE
    creds = client.fetch(["orders-db"])
    for creds in client.watch(["orders-db"]):
        ...

The client keeps the handle of every leased credential and presents it again,
so a reconnect resumes the same database user instead of minting another. It
reacts to the broker's documented reasons (docs/api.md): reconnect at once for
TOKEN_EXPIRED, SHUTTING_DOWN and POLICY_CHANGED, drop a handle on LEASE_LOST,
back off with jitter otherwise, and stop on a denial.
"""

import os
import random
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tessera.v1 import broker_pb2, broker_pb2_grpc

RECONNECT_NOW = {"TOKEN_EXPIRED", "SHUTTING_DOWN", "POLICY_CHANGED"}


class TesseraError(Exception):
    """A call failed; `code` is the gRPC status code, `reason` the ErrorInfo reason."""

    def __init__(self, code, message, reason=None, binding=None, retry_after=None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.binding, self.retry_after = binding, retry_after


class Denied(TesseraError):
    """The policy does not grant a binding to this pod: retrying does not help."""


class Unavailable(TesseraError):
    """The broker or Vault cannot serve it now: retry after `retry_after`."""


class InvalidRequest(TesseraError):
    """The request itself is wrong."""


def _error(err):
    """The typed error for a grpc.RpcError, with its ErrorInfo and RetryInfo."""
    reason = binding = retry_after = None
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, binding = info.reason, info.metadata.get("binding")
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToTimedelta().total_seconds()
    kind = {
        grpc.StatusCode.PERMISSION_DENIED: Denied,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    }.get(err.code(), TesseraError)
    return kind(err.code(), err.details(), reason, binding, retry_after)


class Client:
    """A client of the broker for one pod."""

    def __init__(self, broker, ca_file, token_file):
        target = broker.removeprefix("https://")
        with open(ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        # gRPC's own reconnect backoff grows to 120 s while the broker is away
        # (a rolling update): keep it near the watch's backoff below, so a
        # replica that is back is used within seconds.
        self._channel = grpc.secure_channel(target, credentials, options=[
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ])
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._token_file = token_file
        self.handles = {}  # binding -> handle of the leased credential held
        self.held = {}  # binding -> the last Credential with values

    @classmethod
    def from_env(cls):
        """Configured from what the webhook sets (tessera.dev/api-client)."""
        return cls(os.environ["TESSERA_BROKER"], os.environ["TESSERA_CA_FILE"],
                   os.environ["TESSERA_TOKEN_FILE"])

    def _metadata(self):
        # The kubelet rotates the token: read it for every call.
        with open(self._token_file) as f:
            return [("authorization", "Bearer " + f.read().strip())]

    def _held(self, bindings):
        return [broker_pb2.Held(binding=b, handle=self.handles[b])
                for b in bindings if b in self.handles]

    def _absorb(self, credential):
        if credential.handle:
            self.handles[credential.binding] = credential.handle
        if not credential.unchanged:
            self.held[credential.binding] = credential
        return self.held.get(credential.binding)

    def fetch(self, bindings):
        """The current credentials, all or none, as {binding: Credential}."""
        request = broker_pb2.FetchRequest(bindings=bindings, held=self._held(bindings))
        try:
            answer = self._stub.Fetch(request, metadata=self._metadata(), timeout=30)
        except grpc.RpcError as err:
            raise _error(err) from None
        return {c.binding: self._absorb(c) for c in answer.credentials}

    def watch(self, bindings, max_backoff=30.0):
        """Yields {binding: Credential} once every binding arrived, then at every change."""
        dropped, attempt = set(), 0
        while True:
            held = [h for h in self._held(bindings) if h.binding not in dropped]
            request = broker_pb2.WatchRequest(bindings=bindings, held=held)
            to_receive = len(bindings)
            try:
                for message in self._stub.Watch(request, metadata=self._metadata()):
                    attempt = 0
                    dropped.discard(message.credential.binding)
                    self._absorb(message.credential)
                    to_receive = max(0, to_receive - 1)
                    if to_receive == 0:
                        yield {b: self.held.get(b) for b in bindings}
                delay = 0.2
            except grpc.RpcError as err:
                error = _error(err)
                if error.reason in RECONNECT_NOW:
                    delay = random.uniform(0, 1)
                elif error.reason == "LEASE_LOST" and error.binding:
                    dropped.add(error.binding)
                    delay = random.uniform(0, min(max_backoff, 0.2 * 2 ** attempt))
                elif isinstance(error, (Denied, InvalidRequest)) or \
                        err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise error from None
                else:
                    delay = max(random.uniform(0, min(max_backoff, 0.2 * 2 ** attempt)),
                                error.retry_after or 0)
                attempt += 1
            time.sleep(delay)
