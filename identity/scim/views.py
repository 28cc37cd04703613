"""SCIM 2.0 (RFC 7643 / 7644) at /scim/v2/o/<slug>/: Users (members), Groups (teams), and the
discovery endpoints. DRF views on the REST API's base (portal.api.views.OrganizationAPIView): the
organization's scope is activated there, once the SCIM token is verified and found to be this
organization's (another organization's token gets 404, as for an organization that does not
exist). Bodies are read and written with scim2-models; every error is a SCIM error response.
"""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig
from pydantic import ValidationError as PydanticValidationError
from rest_framework import exceptions, renderers
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView, set_rollback
from scim2_models import (
    AuthenticationScheme,
    Bulk,
    ChangePassword,
    Context,
    Error,
    ETag,
    Filter,
    Group,
    InvalidValueException,
    ListResponse,
    Patch,
    PatchOp,
    ResourceType,
    ResponseParameters,
    Schema,
    SCIMException,
    ServiceProviderConfig,
    Sort,
    User,
)

from identity.models import ScimToken
from identity.scim import directory
from identity.scim.authentication import ScimTokenAuthentication
from identity.scim.filters import group_filter, user_filter
from portal.api.parsers import JSONParser
from portal.api.views import OrganizationAPIView

log = logging.getLogger(__name__)

SCIM_MEDIA_TYPE = "application/scim+json"
MAX_RESULTS = 200


class ScimParser(JSONParser):
    media_type = SCIM_MEDIA_TYPE


class ScimRenderer(renderers.JSONRenderer):
    media_type = SCIM_MEDIA_TYPE


class ScimTokenPermission(BasePermission):
    def has_permission(self, request, view):
        return isinstance(request.auth, ScimToken) and request.member is not None


def _error(status: int, detail: str, scim_type: str | None = None) -> Response:
    return Response(Error(status=status, scim_type=scim_type, detail=detail).model_dump(), status=status)


def scim_exception_handler(exc, context):
    """Every failure as a SCIM error (RFC 7644 §3.12), never Django's HTML page."""
    if isinstance(exc, SCIMException):
        set_rollback()
        error = exc.to_error()
        return Response(error.model_dump(), status=error.status)
    if isinstance(exc, PydanticValidationError):
        errors = Error.from_validation_errors(exc)
        first = errors[0] if errors else Error(status=400, scim_type="invalidValue", detail=str(exc))
        return Response(first.model_dump(), status=400)
    if isinstance(exc, RequestDataTooBig):
        return _error(413, "The request body is too large.")
    if isinstance(exc, exceptions.ParseError):
        return _error(400, str(exc.detail), "invalidSyntax")
    if isinstance(exc, exceptions.APIException):
        response = _error(exc.status_code, str(exc.detail) if not isinstance(exc.detail, (dict, list)) else
                          "The request was refused.")
        if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
            response["WWW-Authenticate"] = ScimTokenAuthentication().authenticate_header(None)
            response.status_code = 401
            response.data["status"] = "401"
        return response
    log.error("SCIM error", exc_info=exc)
    set_rollback()
    return _error(500, "The server failed on this request and changed nothing. Try again later.")


class ScimView(OrganizationAPIView, APIView):
    authentication_classes = [ScimTokenAuthentication]
    permission_classes = [ScimTokenPermission]
    parser_classes = [ScimParser, JSONParser]
    renderer_classes = [ScimRenderer, renderers.JSONRenderer]
    schema = None  # SCIM publishes its own schemas (/Schemas), not in the REST API's OpenAPI document

    def get_exception_handler(self):
        return scim_exception_handler

    def caller(self, request):
        token = request.auth if isinstance(request.auth, ScimToken) else None
        if token is None:
            return None
        if token.organization.slug != request.organization_slug:
            raise exceptions.NotFound("No such organization.")
        return token.created_by

    @property
    def base_url(self) -> str:
        return self.request.build_absolute_uri(f"/scim/v2/o/{self.organization.slug}").rstrip("/")

    @property
    def via(self) -> str:
        token = self.request.auth
        return f"SCIM token {token.display_prefix}…{token.last_four} ({token.name})"

    def body(self, model, context: Context):
        if not isinstance(self.request.data, dict):
            raise exceptions.ParseError("The body is not a JSON object.")
        return model.model_validate(self.request.data, scim_ctx=context)

    def answer(self, resource, context: Context, status: int = 200) -> Response:
        """The resource as SCIM serializes it, with the attributes the query asks for (RFC 7644 §3.9)."""
        query = self.request.query_params
        parameters = ResponseParameters.model_validate(
            {name: query[name] for name in ("attributes", "excludedAttributes") if query.get(name)})
        data = resource.model_dump(scim_ctx=context, response_parameters=parameters)
        return Response(data, status=status, headers={"Location": resource.meta.location} if status == 201 else None)


def _page(request) -> tuple[int, int]:
    """startIndex (1-based) and count, as RFC 7644 §3.4.2.4 reads them: out of range is clamped."""
    def number(name, default):
        value = request.query_params.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            raise InvalidValueException(detail=f"{name} must be an integer.") from None
    return max(number("startIndex", 1), 1), min(max(number("count", MAX_RESULTS), 0), MAX_RESULTS)


class _Collection(ScimView):
    model = None

    def list(self, queryset, to_resource, filter_to_q):
        text = self.request.query_params.get("filter")
        if text:
            queryset = queryset.filter(filter_to_q(text)).distinct()
        start, count = _page(self.request)
        total = queryset.count()
        # A page past the end is empty, not an OFFSET the database cannot take.
        rows = list(queryset[start - 1:start - 1 + count]) if count and start <= total else []
        page = ListResponse[self.model](total_results=total, start_index=start, items_per_page=len(rows),
                                        resources=[to_resource(row, base_url=self.base_url) for row in rows])
        return self.answer(page, Context.SEARCH_RESPONSE)


class UsersView(_Collection):
    model = User

    def get(self, request):
        return self.list(directory.members(organization=self.organization), directory.user_resource, user_filter)

    def post(self, request):
        resource = self.body(User, Context.RESOURCE_CREATION_REQUEST)
        member = directory.user_create(organization=self.organization, actor_member=request.member, resource=resource,
                                       via=self.via)
        member = directory.member_get(organization=self.organization, member_id=str(member.pk))
        return self.answer(directory.user_resource(member, base_url=self.base_url), Context.RESOURCE_CREATION_RESPONSE,
                           status=201)


class UserView(ScimView):
    def member(self, member_id):
        return directory.member_get(organization=self.organization, member_id=member_id)

    def respond(self, member_id, context):
        return self.answer(directory.user_resource(self.member(member_id), base_url=self.base_url), context)

    def get(self, request, member_id):
        return self.respond(member_id, Context.RESOURCE_QUERY_RESPONSE)

    def put(self, request, member_id):
        member = self.member(member_id)
        resource = self.body(User, Context.RESOURCE_REPLACEMENT_REQUEST)
        directory.user_replace(member=member, actor_member=request.member, resource=resource, via=self.via)
        return self.respond(member_id, Context.RESOURCE_REPLACEMENT_RESPONSE)

    def patch(self, request, member_id):
        member = self.member(member_id)
        patch = self.body(PatchOp[User], Context.RESOURCE_PATCH_REQUEST)
        resource = directory.user_resource(member, base_url=self.base_url)
        if patch.patch(resource):
            directory.user_replace(member=member, actor_member=request.member, resource=resource, via=self.via)
        return self.respond(member_id, Context.RESOURCE_PATCH_RESPONSE)

    def delete(self, request, member_id):
        directory.user_delete(member=self.member(member_id), actor_member=request.member, via=self.via)
        return Response(status=204)


class GroupsView(_Collection):
    model = Group

    def get(self, request):
        return self.list(directory.teams(organization=self.organization), directory.group_resource, group_filter)

    def post(self, request):
        resource = self.body(Group, Context.RESOURCE_CREATION_REQUEST)
        team = directory.group_create(organization=self.organization, actor_member=request.member, resource=resource,
                                      via=self.via)
        return self.answer(directory.group_resource(team, base_url=self.base_url), Context.RESOURCE_CREATION_RESPONSE,
                           status=201)


class GroupView(ScimView):
    def team(self, team_id):
        return directory.team_get(organization=self.organization, team_id=team_id)

    def respond(self, team_id, context):
        return self.answer(directory.group_resource(self.team(team_id), base_url=self.base_url), context)

    def get(self, request, team_id):
        return self.respond(team_id, Context.RESOURCE_QUERY_RESPONSE)

    def put(self, request, team_id):
        team = self.team(team_id)
        resource = self.body(Group, Context.RESOURCE_REPLACEMENT_REQUEST)
        directory.group_replace(team=team, actor_member=request.member, resource=resource, via=self.via)
        return self.respond(team_id, Context.RESOURCE_REPLACEMENT_RESPONSE)

    def patch(self, request, team_id):
        team = self.team(team_id)
        patch = self.body(PatchOp[Group], Context.RESOURCE_PATCH_REQUEST)
        resource = directory.group_resource(team, base_url=self.base_url)
        if patch.patch(resource):
            directory.group_replace(team=team, actor_member=request.member, resource=resource, via=self.via)
        return self.respond(team_id, Context.RESOURCE_PATCH_RESPONSE)

    def delete(self, request, team_id):
        directory.group_delete(team=self.team(team_id), actor_member=request.member, via=self.via)
        return Response(status=204)


# -- discovery (RFC 7644 §4) -------------------------------------------------------------------------


def resource_types() -> list[ResourceType]:
    return [ResourceType.from_resource(model) for model in (User, Group)]


class ServiceProviderConfigView(ScimView):
    def get(self, request):
        config = ServiceProviderConfig(
            documentation_uri=None, patch=Patch(supported=True), bulk=Bulk(supported=False, max_operations=0,
                                                                            max_payload_size=0),
            filter=Filter(supported=True, max_results=MAX_RESULTS), change_password=ChangePassword(supported=False),
            sort=Sort(supported=False), etag=ETag(supported=False),
            authentication_schemes=[AuthenticationScheme(
                type="oauthbearertoken", name="SCIM token", primary=True,
                description="The organization's SCIM token (tas_...), issued on its identity settings page.")])
        return self.answer(config, Context.RESOURCE_QUERY_RESPONSE)


class ResourceTypesView(ScimView):
    def get(self, request):
        types = resource_types()
        return self.answer(ListResponse[ResourceType](total_results=len(types), start_index=1,
                                                      items_per_page=len(types), resources=types),
                           Context.SEARCH_RESPONSE)


class SchemasView(ScimView):
    def get(self, request):
        schemas = [User.to_schema(), Group.to_schema()]
        return self.answer(ListResponse[Schema](total_results=len(schemas), start_index=1, items_per_page=len(schemas),
                                                resources=schemas), Context.SEARCH_RESPONSE)
