from rest_framework import serializers

from portal.api import fields
from portal.api.fields import object_id
from portal.forms import ROLE_CHOICES
from portal.models import AuditLogEntry, Invitation, Member, Team
from portal.tenancy import ROLES


class TeamSerializer(fields.ModelSerializer):
    class Meta:
        model = Team
        fields = ["id", "name", "cost_centre", "created_at"]
        read_only_fields = ["id", "created_at"]
        # Uniqueness is checked by the service, scoped to the organization.
        validators = []


class MemberSerializer(fields.ModelSerializer):
    email = fields.EmailField(source="user.email", read_only=True)
    name = fields.CharField(source="user.get_full_name", read_only=True)
    roles = serializers.ListField(child=serializers.ChoiceField(choices=ROLE_CHOICES), allow_empty=False, required=False,
                                  min_length=1, max_length=len(ROLES))
    team = object_id(source="team_id", allow_null=True, required=False)

    class Meta:
        model = Member
        fields = ["id", "email", "name", "team", "roles", "is_active", "joined_at"]
        read_only_fields = ["id", "email", "name", "joined_at"]


class InvitationSerializer(fields.ModelSerializer):
    roles = serializers.ListField(child=serializers.ChoiceField(choices=ROLE_CHOICES), allow_empty=False,
                                  min_length=1, max_length=len(ROLES))
    team = object_id(source="team_id", allow_null=True, required=False)

    class Meta:
        model = Invitation
        fields = ["id", "email", "roles", "team", "status", "created_at", "expires_at", "accepted_at", "revoked_at"]
        read_only_fields = ["id", "status", "created_at", "expires_at", "accepted_at", "revoked_at"]
        validators = []


class AuditLogEntrySerializer(fields.ModelSerializer):
    class Meta:
        model = AuditLogEntry
        fields = ["id", "created_at", "actor_email", "action", "object_type", "object_id", "object_repr", "data"]


class AuditLogFilterSerializer(serializers.Serializer):
    """The audit log's query parameters."""

    action = fields.CharField(required=False, allow_blank=True, max_length=64,
                                   help_text="Actions starting with this, e.g. `grant.`.")
    actor = fields.CharField(required=False, allow_blank=True, max_length=254,
                                  help_text="Actors whose email contains this.")
    object_type = fields.CharField(required=False, allow_blank=True, max_length=64)
