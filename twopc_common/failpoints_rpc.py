"""The SetFailpoints admin call, one handler for both daemons' servicers.

Who may call it is the service's authorization rule (`access.rules`: admins); whether
the daemon accepts it at all is its `--allow-failpoints` (`failpoints.configure_remotely`
refuses otherwise: PERMISSION_DENIED).
"""

from __future__ import annotations

from twopc_common import failpoints
from twopc_common.grpc_errors import Context, translate_errors
from twopc_pb import types_pb2


class FailpointsAdmin:
    """A servicer base whose subclass sets `_allow_failpoints` from its config."""

    _allow_failpoints: bool

    @translate_errors
    async def SetFailpoints(
        self, request: types_pb2.FailpointsRequest, context: Context
    ) -> types_pb2.FailpointsResponse:
        return types_pb2.FailpointsResponse(
            active=failpoints.configure_remotely(self._allow_failpoints, request.spec)
        )
