"""The TwoFactorService servicer: each handler turns a request into plain values, calls one
operation, and turns its result into the response. Policy lives in the call pipeline
(transport/pipeline.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_service import (
    administration,
    audit_log,
    key_import,
    recovery_codes,
    secret_keys,
    sign_in,
    verification,
)
from twofactor_service.key_files import PskcKeys
from twofactor_service.runtime import Runtime
from twofactor_service.store.audit import AuditFilter
from twofactor_service.transport import messages, metrics
from twofactor_service.transport.call_context import caller, step_up_proven

_VERIFY_RESULTS = {
    verification.VerifyResult.OK: enums_pb2.VERIFY_CODE_RESULT_OK,
    verification.VerifyResult.FAILED: enums_pb2.VERIFY_CODE_RESULT_FAILED,
    verification.VerifyResult.FAILED_MAX_ATTEMPTS: enums_pb2.VERIFY_CODE_RESULT_FAILED_MAX_ATTEMPTS,
}

Context = grpc.aio.ServicerContext[Any, Any]


class TwoFactorServicer(pb_grpc.TwoFactorServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.verifier = verification.Verifier(
            runtime,
            max_batches_in_flight=runtime.config.verify_batches_in_flight,
            observe_batch=metrics.observe_verify_batch,
        )

    # --- Sign-in (O6)

    async def SignIn(self, request: pb.SignInRequest, context: Context) -> pb.SignInResponse:
        result = await sign_in.sign_in(
            self.runtime,
            caller(),
            request.username,
            request.password,
            request.code,
            request.recovery_code,
        )
        return pb.SignInResponse(**messages.sign_in_fields(result))  # type: ignore[arg-type]

    async def SignInDomainAccount(
        self, request: pb.SignInDomainAccountRequest, context: Context
    ) -> pb.SignInDomainAccountResponse:
        result = await sign_in.sign_in_domain_account(
            self.runtime, caller(), request.username, request.code, request.recovery_code
        )
        return pb.SignInDomainAccountResponse(**messages.sign_in_fields(result))  # type: ignore[arg-type]

    async def CompleteEnrollment(
        self, request: pb.CompleteEnrollmentRequest, context: Context
    ) -> pb.CompleteEnrollmentResponse:
        opened = await sign_in.complete_enrollment(
            self.runtime, caller(), request.enrollment_ticket, request.code
        )
        return pb.CompleteEnrollmentResponse(session=messages.session(opened))

    async def SignOut(self, request: pb.SignOutRequest, context: Context) -> pb.SignOutResponse:
        await sign_in.sign_out(self.runtime, caller())
        return pb.SignOutResponse()

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: Context
    ) -> pb.ChangePasswordResponse:
        await sign_in.change_password(
            self.runtime, caller(), request.current_password, request.new_password
        )
        return pb.ChangePasswordResponse()

    # --- Own key (O1, O2)

    async def BeginRegenerateSecret(
        self, request: pb.BeginRegenerateSecretRequest, context: Context
    ) -> pb.BeginRegenerateSecretResponse:
        view = await secret_keys.begin_regenerate(self.runtime, caller())
        return pb.BeginRegenerateSecretResponse(pending_key=messages.pending_key(view))

    async def ConfirmRegenerateSecret(
        self, request: pb.ConfirmRegenerateSecretRequest, context: Context
    ) -> pb.ConfirmRegenerateSecretResponse:
        record = await secret_keys.confirm_regenerate(self.runtime, caller(), request.code)
        return pb.ConfirmRegenerateSecretResponse(status=messages.account_status(record))

    # --- Recovery codes (O11)

    async def GenerateRecoveryCodes(
        self, request: pb.GenerateRecoveryCodesRequest, context: Context
    ) -> pb.GenerateRecoveryCodesResponse:
        codes, record = await recovery_codes.generate(
            self.runtime, caller(), request.code, proven_by_step_up=step_up_proven.get()
        )
        return pb.GenerateRecoveryCodesResponse(
            recovery_codes=codes.codes, status=messages.account_status(record)
        )

    # --- Another account's key (O3, O4)

    async def ResetSecret(
        self, request: pb.ResetSecretRequest, context: Context
    ) -> pb.ResetSecretResponse:
        record = await secret_keys.reset_secret(self.runtime, caller(), request.username)
        return pb.ResetSecretResponse(status=messages.account_status(record))

    async def DeleteSecret(
        self, request: pb.DeleteSecretRequest, context: Context
    ) -> pb.DeleteSecretResponse:
        record = await secret_keys.delete_secret(self.runtime, caller(), request.username)
        return pb.DeleteSecretResponse(status=messages.account_status(record))

    # --- Lists (O5)

    async def AddToAllowlist(
        self, request: pb.AddToAllowlistRequest, context: Context
    ) -> pb.AddToAllowlistResponse:
        record = await administration.add_to_allowlist(self.runtime, caller(), request.username)
        return pb.AddToAllowlistResponse(status=messages.account_status(record))

    async def RemoveFromAllowlist(
        self, request: pb.RemoveFromAllowlistRequest, context: Context
    ) -> pb.RemoveFromAllowlistResponse:
        record = await administration.remove_from_allowlist(
            self.runtime, caller(), request.username
        )
        return pb.RemoveFromAllowlistResponse(status=messages.account_status(record))

    async def ListAllowlist(
        self, request: pb.ListAllowlistRequest, context: Context
    ) -> pb.ListAllowlistResponse:
        records, token = await administration.list_members(
            self.runtime, "allowlisted", request.page_size, request.page_token
        )
        return pb.ListAllowlistResponse(
            accounts=[messages.account_status(r) for r in records], next_page_token=token
        )

    async def AddToExclusionList(
        self, request: pb.AddToExclusionListRequest, context: Context
    ) -> pb.AddToExclusionListResponse:
        record = await administration.add_to_exclusion_list(
            self.runtime, caller(), request.username
        )
        return pb.AddToExclusionListResponse(status=messages.account_status(record))

    async def RemoveFromExclusionList(
        self, request: pb.RemoveFromExclusionListRequest, context: Context
    ) -> pb.RemoveFromExclusionListResponse:
        record = await administration.remove_from_exclusion_list(
            self.runtime, caller(), request.username
        )
        return pb.RemoveFromExclusionListResponse(status=messages.account_status(record))

    async def ListExclusionList(
        self, request: pb.ListExclusionListRequest, context: Context
    ) -> pb.ListExclusionListResponse:
        records, token = await administration.list_members(
            self.runtime, "excluded", request.page_size, request.page_token
        )
        return pb.ListExclusionListResponse(
            accounts=[messages.account_status(r) for r in records], next_page_token=token
        )

    # --- Verify (O7) and status (O8)

    async def VerifyCode(
        self, request: pb.VerifyCodeRequest, context: Context
    ) -> pb.VerifyCodeResponse:
        outcome = await verification.verify_code(
            self.verifier, caller(), request.username, request.code
        )
        metrics.count_verify_outcome(outcome.check)
        response = pb.VerifyCodeResponse(result=_VERIFY_RESULTS[outcome.result])
        if outcome.retry_after_seconds > 0:
            response.retry_delay.FromSeconds(max(1, round(outcome.retry_after_seconds)))
        return response

    async def ListAccounts(
        self, request: pb.ListAccountsRequest, context: Context
    ) -> pb.ListAccountsResponse:
        records, token = await administration.list_accounts(
            self.runtime, request.username_prefix, request.page_size, request.page_token
        )
        return pb.ListAccountsResponse(
            accounts=[messages.account_status(r) for r in records], next_page_token=token
        )

    async def GetAccountStatus(
        self, request: pb.GetAccountStatusRequest, context: Context
    ) -> pb.GetAccountStatusResponse:
        record = await administration.account_status(self.runtime, caller(), request.username)
        return pb.GetAccountStatusResponse(status=messages.account_status(record))

    # --- Audit log (O9)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        where = AuditFilter(
            target=request.target_username,
            actor=request.actor_username,
            operation=request.operation,
            start=messages.request_time(request.start_time, "start_time")
            if request.HasField("start_time")
            else None,
            end=messages.request_time(request.end_time, "end_time")
            if request.HasField("end_time")
            else None,
        )
        rows, token = await audit_log.list_events(
            self.runtime, where, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            events=[messages.audit_event(r) for r in rows], next_page_token=token
        )

    async def WatchAuditEvents(
        self, request: pb.WatchAuditEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchAuditEventsResponse]:
        async for row in audit_log.follow(self.runtime, request.after_sequence):
            yield pb.WatchAuditEventsResponse(event=messages.audit_event(row))

    # --- Settings and accounts (O10)

    def _settings(self, issuer: str) -> pb.Settings:
        totp = self.runtime.config.totp
        return pb.Settings(
            issuer_name=issuer,
            totp_algorithm=totp.algorithm,
            totp_digits=totp.digits,
            totp_period_seconds=totp.period_seconds,
            totp_valid_window=totp.valid_window,
        )

    async def GetSettings(
        self, request: pb.GetSettingsRequest, context: Context
    ) -> pb.GetSettingsResponse:
        issuer = await administration.issuer_name(self.runtime)
        return pb.GetSettingsResponse(settings=self._settings(issuer))

    async def UpdateSettings(
        self, request: pb.UpdateSettingsRequest, context: Context
    ) -> pb.UpdateSettingsResponse:
        issuer = await administration.set_issuer_name(self.runtime, caller(), request.issuer_name)
        return pb.UpdateSettingsResponse(settings=self._settings(issuer))

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: Context
    ) -> pb.CreateAccountResponse:
        record = await administration.create_account(
            self.runtime,
            caller(),
            username=request.username,
            kind=messages.account_kind(request.kind),
            password=request.password,
            protected=request.protected,
            excluded=request.exclude_from_two_factor,
        )
        return pb.CreateAccountResponse(status=messages.account_status(record))

    async def SetAccountProtection(
        self, request: pb.SetAccountProtectionRequest, context: Context
    ) -> pb.SetAccountProtectionResponse:
        record = await administration.set_protection(
            self.runtime, caller(), request.username, request.protected
        )
        return pb.SetAccountProtectionResponse(status=messages.account_status(record))

    async def GrantRight(
        self, request: pb.GrantRightRequest, context: Context
    ) -> pb.GrantRightResponse:
        record = await administration.change_right(
            self.runtime,
            caller(),
            request.username,
            (request.right.functional_area, request.right.permission),
            grant=True,
        )
        return pb.GrantRightResponse(status=messages.account_status(record))

    async def RevokeRight(
        self, request: pb.RevokeRightRequest, context: Context
    ) -> pb.RevokeRightResponse:
        record = await administration.change_right(
            self.runtime,
            caller(),
            request.username,
            (request.right.functional_area, request.right.permission),
            grant=False,
        )
        return pb.RevokeRightResponse(status=messages.account_status(record))

    # --- Import (O12)

    async def ImportSecrets(
        self, request: pb.ImportSecretsRequest, context: Context
    ) -> pb.ImportSecretsResponse:
        report = await key_import.import_secrets(
            self.runtime,
            caller(),
            key_import.ImportRequest(
                file_format=messages.import_format(request.format),
                content=request.content,
                validate_only=request.validate_only,
                replace_existing_keys=request.replace_existing_keys,
                pskc=PskcKeys(
                    pre_shared_key=request.pre_shared_key,
                    passphrase=request.passphrase,
                    key_accounts=dict(request.key_accounts),
                ),
            ),
        )
        return pb.ImportSecretsResponse(
            secrets=[messages.imported_secret(entry) for entry in report.keys],
            validate_only=report.validate_only,
        )
