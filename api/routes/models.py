"""The served models, as OpenAI's model list (`client.models.list()`)."""

from fastapi import APIRouter, Depends

from api.deps import get_owner
from api.dialects import MODELS_PATHS
from api.dialects.openai import ModelCard, ModelList, model_card, model_list
from api.interactive import served_model

router = APIRouter(tags=["models"], dependencies=[Depends(get_owner)])


def list_models() -> ModelList:
    """The served models, each with its aliases (OpenAI's model list)."""
    return model_list()


def get_model(model: str) -> ModelCard:
    """One served model, by its name or any alias."""
    return model_card(served_model(model))


for path in MODELS_PATHS:
    # DeepInfra's `/v1/openai` prefix is the same operation, which the document shows once.
    shown = path == MODELS_PATHS[0]
    router.add_api_route(
        path, list_models, methods=["GET"], response_model=ModelList, include_in_schema=shown
    )
    router.add_api_route(
        path + "/{model:path}",
        get_model,
        methods=["GET"],
        response_model=ModelCard,
        include_in_schema=shown,
    )
