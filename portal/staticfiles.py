"""Static files served by the portal itself (WhiteNoise), without slowing the async gateway.

WhiteNoise's middleware is sync-only; in an ASGI middleware chain one sync middleware makes
Django run every request, gateway calls included, through a single thread. This subclass is
async-capable and only leaves the event loop for requests under STATIC_URL.
"""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    sync_capable = async_capable = True

    def __init__(self, get_response):
        super().__init__(get_response)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self._acall(request)
        return super().__call__(request)

    def _static_response(self, request):
        found = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if found is None:
            return None
        streamed = self.serve(found, request)
        # Read in the worker thread: the portal's assets are small, and a file iterator would be
        # read synchronously by the ASGI handler anyway.
        response = HttpResponse(b"".join(streamed.streaming_content), status=streamed.status_code)
        del response["Content-Type"]
        for header, value in streamed.items():
            response[header] = value
        streamed.close()
        return response

    async def _acall(self, request):
        if request.path_info.startswith(self.static_prefix):
            response = await sync_to_async(self._static_response, thread_sensitive=False)(request)
            if response is not None:
                return response
        return await self.get_response(request)
