from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinTokenInfo(_message.Message):
    __slots__ = ("id", "description", "node_name", "created_at", "expires_at", "used_at", "used_by", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    USED_AT_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    description: str
    node_name: str
    created_at: float
    expires_at: float
    used_at: float
    used_by: str
    state: str
    def __init__(self, id: _Optional[str] = ..., description: _Optional[str] = ..., node_name: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., used_at: _Optional[float] = ..., used_by: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("ttl_seconds", "description", "node_name", "any_node", "needs_approval")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ANY_NODE_FIELD_NUMBER: _ClassVar[int]
    NEEDS_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: float
    description: str
    node_name: str
    any_node: bool
    needs_approval: bool
    def __init__(self, ttl_seconds: _Optional[float] = ..., description: _Optional[str] = ..., node_name: _Optional[str] = ..., any_node: _Optional[bool] = ..., needs_approval: _Optional[bool] = ...) -> None: ...

class CreateJoinTokenReply(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: JoinTokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[JoinTokenInfo, _Mapping]] = ...) -> None: ...

class ListJoinTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJoinTokensReply(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[JoinTokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[JoinTokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeJoinTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeJoinTokenReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class ConsumeJoinTokenRequest(_message.Message):
    __slots__ = ("token_id", "secret_hash", "node_name")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    secret_hash: str
    node_name: str
    def __init__(self, token_id: _Optional[str] = ..., secret_hash: _Optional[str] = ..., node_name: _Optional[str] = ...) -> None: ...

class ConsumeJoinTokenReply(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("id", "name", "tenant", "models", "admin", "state", "created_at", "expires_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tenant: str
    models: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    state: str
    created_at: float
    expires_at: float
    revoked_at: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tenant: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., revoked_at: _Optional[float] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "models", "name", "admin", "ttl_seconds")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    models: _containers.RepeatedScalarFieldContainer[str]
    name: str
    admin: bool
    ttl_seconds: float
    def __init__(self, tenant: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., admin: _Optional[bool] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CreateApiKeyReply(_message.Message):
    __slots__ = ("key", "info")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    key: str
    info: ApiKeyInfo
    def __init__(self, key: _Optional[str] = ..., info: _Optional[_Union[ApiKeyInfo, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListApiKeysReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyReply(_message.Message):
    __slots__ = ("info", "index", "lagging")
    INFO_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    info: ApiKeyInfo
    index: int
    lagging: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, info: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., index: _Optional[int] = ..., lagging: _Optional[_Iterable[str]] = ...) -> None: ...

class RevokeCertificateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeCertificateReply(_message.Message):
    __slots__ = ("message", "index", "lagging", "removed")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    message: str
    index: int
    lagging: _containers.RepeatedScalarFieldContainer[str]
    removed: bool
    def __init__(self, message: _Optional[str] = ..., index: _Optional[int] = ..., lagging: _Optional[_Iterable[str]] = ..., removed: _Optional[bool] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewCertificateReply(_message.Message):
    __slots__ = ("cert_pem", "ca_pem", "signer")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    ca_pem: bytes
    signer: str
    def __init__(self, cert_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., signer: _Optional[str] = ...) -> None: ...

class ApproveNodeRequest(_message.Message):
    __slots__ = ("name", "tenants")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class ApproveNodeReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class RotateClusterSecretRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateClusterSecretReply(_message.Message):
    __slots__ = ("message", "instances_on_old_secret", "lagging")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_ON_OLD_SECRET_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    message: str
    instances_on_old_secret: int
    lagging: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, message: _Optional[str] = ..., instances_on_old_secret: _Optional[int] = ..., lagging: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("token_id", "secret", "csr_pem")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    secret: str
    csr_pem: bytes
    def __init__(self, token_id: _Optional[str] = ..., secret: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("cert_pem", "ca_pem", "peers", "signer")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    ca_pem: bytes
    peers: _containers.RepeatedScalarFieldContainer[str]
    signer: str
    def __init__(self, cert_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., peers: _Optional[_Iterable[str]] = ..., signer: _Optional[str] = ...) -> None: ...
