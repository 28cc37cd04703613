import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from portal.api.parsers import RequestTooLarge

log = logging.getLogger(__name__)


def exception_handler(exc, context):
    """DRF's handler, plus services' Django ValidationErrors as 400 answers keyed by field, a body
    past Django's size limit as 413, and JSON (not Django's HTML page) for an unexpected failure, logged with its traceback."""
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail=detail)
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    response = drf_exception_handler(exc, context)
    if response is None:
        log.error("API error", exc_info=exc)
        set_rollback()
        response = Response({"detail": "The server failed on this request and changed nothing. Try again later."},
                            status=500)
    return response
