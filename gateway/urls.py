from django.urls import path, re_path

from gateway import endpoints

# The paths the OpenAI and Anthropic SDKs call, relative to a base URL of <portal>/v1.
urlpatterns = [
    path("v1/chat/completions", endpoints.chat_completions, name="gateway_chat_completions"),
    path("v1/embeddings", endpoints.embeddings, name="gateway_embeddings"),
    path("v1/messages", endpoints.messages, name="gateway_messages"),
    path("v1/models", endpoints.models, name="gateway_models"),
]
urlpatterns.append(re_path(r"^v1/", endpoints.not_found))  # JSON, in the API's shape, for any other /v1 path
