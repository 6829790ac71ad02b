"""The emulator's conversation record and its rendering into the upstream JSON shapes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("initiated", "in-progress", "processing", "done", "failed")
EVALUATION_RESULTS = ("success", "failure", "unknown")
FEEDBACK_SCORES = ("like", "dislike")


@dataclass
class Conversation:
    """One stored conversation: the fields the list filters use plus the transcript and client data."""

    conversation_id: str
    agent_id: str
    agent_name: str | None
    user_id: str | None
    start_time_unix_secs: int
    call_duration_secs: int
    status: str
    call_successful: str
    transcript_summary: str
    call_summary_title: str | None
    rating: int | None
    feedback_comment: str | None
    feedback_score: str | None
    evaluations: dict[str, str]
    data_collection: dict[str, Any]
    transcript: list[dict[str, Any]]
    dynamic_variables: dict[str, Any]
    audio_size_bytes: int
    extra_tool_names: list[str] = field(default_factory=list)
    source: str = "js_sdk"
    authorization_method: str = "signed_url"

    def tool_names(self) -> list[str]:
        """Return the names of the tools called in the transcript plus any declared explicitly, in order."""
        names: list[str] = []
        for turn in self.transcript:
            for call in turn.get("tool_calls") or []:
                name = call.get("tool_name")
                if isinstance(name, str) and name not in names:
                    names.append(name)
        for name in self.extra_tool_names:
            if name not in names:
                names.append(name)
        return names

    def messages(self) -> list[str]:
        """Return the text of every transcript turn that has one."""
        return [turn["message"] for turn in self.transcript if isinstance(turn.get("message"), str)]

    def summary(self, *, include_summary: bool) -> dict[str, Any]:
        """Render this conversation as a ConversationSummaryResponseModel row."""
        row: dict[str, Any] = {
            "agent_id": self.agent_id,
            "branch_id": None,
            "agent_name": self.agent_name,
            "conversation_id": self.conversation_id,
            "start_time_unix_secs": self.start_time_unix_secs,
            "call_duration_secs": self.call_duration_secs,
            "message_count": len(self.transcript),
            "status": self.status,
            "call_successful": self.call_successful,
            "call_summary_title": self.call_summary_title,
            "direction": None,
            "rating": None if self.rating is None else float(self.rating),
        }
        if include_summary:
            row["transcript_summary"] = self.transcript_summary
        return row

    def details(self) -> dict[str, Any]:
        """Render this conversation as a full GetConversationResponseModel."""
        finished = self.status in ("done", "failed")
        return {
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "conversation_id": self.conversation_id,
            "status": self.status,
            "user_id": self.user_id,
            "branch_id": None,
            "transcript": copy.deepcopy(self.transcript),
            "metadata": self._metadata(),
            "analysis": self._analysis() if finished else None,
            "conversation_initiation_client_data": self._client_data(),
            "has_audio": self.audio_size_bytes > 0,
            "has_user_audio": self.audio_size_bytes > 0,
            "has_response_audio": self.audio_size_bytes > 0,
            "has_auxiliary_audio": False,
        }

    def _feedback(self) -> dict[str, Any]:
        return {
            "type": "thumbs" if self.feedback_score else ("rating" if self.rating is not None else None),
            "overall_score": self.feedback_score,
            "likes": 1 if self.feedback_score == "like" else 0,
            "dislikes": 1 if self.feedback_score == "dislike" else 0,
            "rating": self.rating,
            "comment": self.feedback_comment,
        }

    def _metadata(self) -> dict[str, Any]:
        minutes = max(self.call_duration_secs, 1) / 60
        input_tokens = 900 + 40 * len(self.transcript)
        output_tokens = 60 * len(self.transcript)
        usage = {
            "model_usage": {
                "gpt-4o-mini": {
                    "input": {"tokens": input_tokens, "price": round(input_tokens * 1.5e-7, 8)},
                    "input_cache_read": {
                        "tokens": input_tokens // 2,
                        "price": round(input_tokens * 3.75e-8, 8),
                    },
                    "input_cache_write": {"tokens": 0, "price": 0.0},
                    "output_total": {"tokens": output_tokens, "price": round(output_tokens * 6e-7, 8)},
                }
            }
        }
        call_charge = round(minutes * 400)
        return {
            "start_time_unix_secs": self.start_time_unix_secs,
            "accepted_time_unix_secs": self.start_time_unix_secs,
            "call_duration_secs": self.call_duration_secs,
            "cost": call_charge + 3,
            "deletion_settings": {
                "deletion_time_unix_secs": None,
                "deleted_logs_at_time_unix_secs": None,
                "deleted_audio_at_time_unix_secs": None,
                "deleted_transcript_at_time_unix_secs": None,
                "delete_transcript_and_pii": False,
                "delete_audio": False,
            },
            "feedback": self._feedback(),
            "authorization_method": self.authorization_method,
            "charging": {
                "dev_discount": False,
                "is_burst": False,
                "tier": "creator",
                "llm_usage": {"irreversible_generation": usage, "initiated_generation": usage},
                "llm_price": round((input_tokens * 1.5e-7) + (output_tokens * 6e-7), 8),
                "llm_charge": 3,
                "call_charge": call_charge,
                "free_minutes_consumed": 0.0,
                "free_llm_dollars_consumed": 0.0,
            },
            "phone_call": None,
            "batch_call": None,
            "termination_reason": "end_call tool was called." if self.status == "done" else "",
            "error": {"code": 1011, "reason": "Agent failed to respond"} if self.status == "failed" else None,
            "warnings": [],
            "main_language": "en",
            "rag_usage": {"usage_count": 1, "embedding_model": "e5_mistral_7b_instruct"},
            "text_only": self.audio_size_bytes == 0,
            "features_usage": {
                "language_detection": {"enabled": False, "used": False},
                "transfer_to_agent": {"enabled": False, "used": False},
                "transfer_to_number": {"enabled": False, "used": False},
                "multivoice": {"enabled": False, "used": False},
                "dtmf_tones": {"enabled": False, "used": False},
                "external_mcp_servers": {
                    "enabled": True,
                    "used": "search_knowledge_base" in self.tool_names(),
                },
                "pii_zrm_workspace": False,
                "pii_zrm_agent": False,
                "tool_dynamic_variable_updates": {"enabled": False, "used": False},
                "is_livekit": self.authorization_method == "livekit_token",
                "voicemail_detection": {"enabled": False, "used": False},
                "workflow": {"enabled": False},
                "agent_testing": {
                    "enabled": False,
                    "tests_ran_after_last_modification": False,
                    "tests_ran_in_last_7_days": False,
                },
            },
            "eleven_assistant": {"is_eleven_assistant": False},
            "initiator_id": None,
            "conversation_initiation_source": self.source,
            "conversation_initiation_source_version": "2.3.0",
            "timezone": "Europe/Berlin",
            "initiation_trigger": {"trigger_type": "default"},
            "async_metadata": None,
            "whatsapp": None,
            "agent_created_from": "ui",
            "agent_last_updated_from": "api",
        }

    def _analysis(self) -> dict[str, Any]:
        return {
            "evaluation_criteria_results": {
                criteria_id: {
                    "criteria_id": criteria_id,
                    "result": result,
                    "rationale": f"The agent's behaviour was judged '{result}' for {criteria_id}.",
                }
                for criteria_id, result in self.evaluations.items()
            },
            "data_collection_results": {
                item_id: {
                    "data_collection_id": item_id,
                    "value": value,
                    "json_schema": {
                        "type": _json_type(value),
                        "description": f"The {item_id} the caller gave.",
                    },
                    "rationale": f"The caller mentioned their {item_id}.",
                }
                for item_id, value in self.data_collection.items()
            },
            "call_successful": self.call_successful,
            "transcript_summary": self.transcript_summary,
            "call_summary_title": self.call_summary_title,
        }

    def _client_data(self) -> dict[str, Any]:
        return {
            "conversation_config_override": {
                "turn": None,
                "tts": None,
                "conversation": None,
                "agent": {"first_message": None, "language": "en", "prompt": None},
            },
            "custom_llm_extra_body": {},
            "user_id": self.user_id,
            "source_info": {"source": self.source, "version": "2.3.0"},
            "dynamic_variables": {
                **self.dynamic_variables,
                "system__agent_id": self.agent_id,
                "system__conversation_id": self.conversation_id,
                "system__call_duration_secs": self.call_duration_secs,
            },
        }


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"
