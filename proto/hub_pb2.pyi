from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileInfo(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "strategy", "concepts", "created_at", "files", "base_fingerprint", "base_source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    strategy: str
    concepts: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    base_fingerprint: str
    base_source: str
    def __init__(self, version: _Optional[int] = ..., strategy: _Optional[str] = ..., concepts: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., base_fingerprint: _Optional[str] = ..., base_source: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVersionsReply(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class ConceptInfo(_message.Message):
    __slots__ = ("name", "token", "class_word", "method", "origin", "accepted_at", "round", "fidelity_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: str
    class_word: str
    method: str
    origin: str
    accepted_at: float
    round: int
    fidelity_json: str
    def __init__(self, name: _Optional[str] = ..., token: _Optional[str] = ..., class_word: _Optional[str] = ..., method: _Optional[str] = ..., origin: _Optional[str] = ..., accepted_at: _Optional[float] = ..., round: _Optional[int] = ..., fidelity_json: _Optional[str] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListConceptsReply(_message.Message):
    __slots__ = ("version", "concepts")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptInfo]
    def __init__(self, version: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[ConceptInfo, _Mapping]]] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetReportReply(_message.Message):
    __slots__ = ("version", "json", "markdown")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    MARKDOWN_FIELD_NUMBER: _ClassVar[int]
    version: int
    json: str
    markdown: str
    def __init__(self, version: _Optional[int] = ..., json: _Optional[str] = ..., markdown: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("version", "file", "offset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    version: int
    file: str
    offset: int
    def __init__(self, version: _Optional[int] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
