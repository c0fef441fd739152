"""The one error tree of iotvault.

Every error iotvault raises on purpose derives from :class:`IotVaultError`. Classes marked
with a module in parentheses below live beside the code that raises them. Third-party
exceptions (SQLAlchemy, gmqtt, amqtt, cryptography, OS errors) are translated into this tree at
the adapter that calls the library, with ``raise Mapped(...) from exc``, so that the core and
the command line only ever see these classes. Each error carries the data a program needs as
attributes and a message a person can act on.

::

    IotVaultError
    ├── ConfigError                  a setting is missing or invalid (names the setting)
    ├── UnsupportedLibraryError      an installed library is not the version iotvault was built on
    ├── ValidationError              input does not satisfy a value object
    │   └── TopicError               an MQTT topic is not one of the contract's topics
    ├── CryptoError
    │   ├── MasterKeyError           the master key file is missing, unreadable or wrong
    │   ├── KeyUnwrapError           a wrapped data key does not open with the master key
    │   ├── DataKeyNotFoundError     no data key (or it was destroyed: crypto-shredding)
    │   ├── RecordDecryptionError    a stored record was tampered with or moved
    │   └── SignatureError           a signed command does not verify (unsigned, forged, wrong key)
    ├── StorageError
    │   ├── DatabaseUnavailableError the database cannot be reached
    │   │   └── DatabaseUnwritableError  it answers but cannot write (disk full, read-only)
    │   ├── SchemaError              the schema is missing or not at the expected revision
    │   ├── NotInitialisedError      a read-only command found no installation (creates none)
    │   ├── DeviceExistsError
    │   ├── DeviceNotFoundError
    │   ├── CommandNotFoundError     no such command of that device
    │   └── (storage.accounts) UserExistsError, UserNotFoundError, GroupExistsError,
    │       GroupNotFoundError, ApiKeyExistsError, ApiKeyNotFoundError
    ├── (auth.claims) InvalidTokenError        a bearer token is refused (.reason is safe to show)
    ├── (apiprocs) ApiProcessesFailedError     `serve --api-processes`: the children kept dying
    ├── (ingest.pipeline) IngestFailedError    a batch failed for a reason other than an outage
    ├── BrokerError
    │   ├── BrokerUnavailableError   the MQTT broker cannot be reached
    │   ├── BrokerAdminError         the broker refused an account change (Mosquitto dynamic security)
    │   ├── IngestNotConfirmedError  a broker acknowledged events iotvault never stored (simulate)
    │   └── (device.connection) DeviceRefusedError  the broker refused a device's credentials
    ├── CommandError                 a command to a device cannot be made or sent
    │   └── CommandRejectedError     a device refuses a command (.reason: unsigned, expired, replayed…)
    ├── IdentityError                the built-in OpenID Connect provider (iotvault.identity)
    │   ├── OAuthError               a protocol request is refused (.error: the RFC 6749 error code)
    │   ├── ClientNotFoundError      no OAuth client of that id
    │   ├── ClientExistsError        an OAuth client of that id exists already
    │   └── (identity.login) LoginError  `iotvault login` cannot reach the provider
    └── PortInUseError               a listening port (HTTP or embedded MQTT) is taken

``NotFoundError`` is a second base of every "does not exist" error above (device, command,
user, group, API key, OAuth client): the command line adds to them which database it used.
"""

from __future__ import annotations


class IotVaultError(Exception):
    """Base of every error iotvault raises on purpose."""


class ConfigError(IotVaultError):
    """A setting is missing or invalid."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"invalid setting {setting}: {reason}")


class UnsupportedLibraryError(IotVaultError):
    """An installed library is not the version whose internals iotvault relies on.

    Raised at start by :mod:`iotvault.adapters`, so that an upgrade shows as one message rather
    than as a wrong behaviour later.
    """

    def __init__(self, library: str, installed: str, supported: str) -> None:
        self.library = library
        self.installed = installed
        self.supported = supported
        super().__init__(
            f"{library} {installed} is installed, but iotvault relies on internals of {library} "
            f"{supported}; install {library}=={supported} (requirements/runtime.txt pins it)"
        )


class ValidationError(IotVaultError):
    """Input does not satisfy a value object's rules."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class TopicError(ValidationError):
    """An MQTT topic is not one of the topics of the contract."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        super().__init__("topic", reason)


class CryptoError(IotVaultError):
    """Base of the cryptographic errors."""


class MasterKeyError(CryptoError):
    """The master key file is missing, unreadable, too open, or does not match the database."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"master key {path}: {reason}")


class KeyUnwrapError(CryptoError):
    """A wrapped data key does not open with the master key (wrong key or tampering)."""

    def __init__(self, device_id: str, version: int) -> None:
        self.device_id = device_id
        self.version = version
        super().__init__(f"data key v{version} of device {device_id!r} does not open with the master key")


class DataKeyNotFoundError(CryptoError):
    """The data key a record needs does not exist (never made, or destroyed)."""

    def __init__(self, device_id: str, version: int | None = None) -> None:
        self.device_id = device_id
        self.version = version
        which = f"v{version}" if version is not None else "any version"
        super().__init__(f"no data key ({which}) for device {device_id!r}")


class RecordDecryptionError(CryptoError):
    """A stored record does not decrypt: tampered, truncated, or moved to another row."""

    def __init__(self, device_id: str, event_id: str, reason: str) -> None:
        self.device_id = device_id
        self.event_id = event_id
        self.reason = reason
        super().__init__(f"event {event_id} of device {device_id!r} does not decrypt: {reason}")


class StorageError(IotVaultError):
    """Base of the storage errors."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach the database {url}: {reason} (set IOTVAULT_DATABASE_URL or database_url)"
        )


class DatabaseUnwritableError(DatabaseUnavailableError):
    """The database answers but cannot write: its disk is full or its file system read-only.

    A kind of unavailability (ingest retries, the API answers 503), with its own message: the
    fix is disk space or permissions, not the URL.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        StorageError.__init__(
            self, f"the database {url} cannot write: {reason} (free disk space, or make it writable)"
        )


class SchemaError(StorageError):
    """The schema is missing or not at the revision this version of iotvault needs."""


class DeviceExistsError(StorageError):
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(f"device {device_id!r} already exists")


class NotFoundError(IotVaultError):
    """Something named does not exist; the command line adds which database it looked in."""


class NotInitialisedError(StorageError):
    """A command that only reads found no installation where the settings point."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        super().__init__(
            f"no iotvault database in data dir {data_dir}: run this where the node runs, or point "
            "IOTVAULT_DATA_DIR (or IOTVAULT_DATABASE_URL, or --config) at its data; a command that "
            "only reads never creates one"
        )


class DeviceNotFoundError(StorageError, NotFoundError):
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(f"device {device_id!r} does not exist")


class BrokerError(IotVaultError):
    """Base of the MQTT broker errors."""


class BrokerUnavailableError(BrokerError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the MQTT broker {url}: {reason} (set IOTVAULT_BROKER_URL)")


class IngestNotConfirmedError(BrokerError):
    """Events a broker acknowledged never reached iotvault's database (``iotvault simulate``)."""

    def __init__(self, broker: str, acknowledged: int, stored: int, data_dir: str) -> None:
        self.broker, self.acknowledged, self.stored = broker, acknowledged, stored
        super().__init__(
            f"the broker at {broker} acknowledged {acknowledged} events but iotvault stored {stored} "
            f"(data dir {data_dir}): that broker is not this iotvault's, or its ingest is not running; "
            "start 'iotvault serve' (or the demo) with this data dir, or give --host/--port"
        )


class PortInUseError(IotVaultError):
    def __init__(self, host: str, port: int, setting: str) -> None:
        self.host = host
        self.port = port
        self.setting = setting
        super().__init__(f"port {port} on {host} is already in use; choose another with {setting}")


class IdentityError(IotVaultError):
    """Base of the errors of the built-in OpenID Connect provider."""


class OAuthError(IdentityError):
    """A request to the OpenID Connect provider is refused, in the protocol's own terms.

    ``error`` is the RFC 6749 / OpenID Connect / RFC 8628 error code (``invalid_grant``,
    ``invalid_client``, ``authorization_pending``, ...), ``description`` a short reason that is
    safe to show to the client, ``status`` the HTTP status the token-style endpoints answer with.
    """

    def __init__(self, error: str, description: str = "", *, status: int = 400) -> None:
        self.error = error
        self.description = description
        self.status = status
        super().__init__(f"{error}: {description}" if description else error)


class ClientNotFoundError(IdentityError, NotFoundError):
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        super().__init__(f"OAuth client {client_id!r} does not exist")


class ClientExistsError(IdentityError):
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        super().__init__(f"OAuth client {client_id!r} already exists")


# ---- device security: signed commands and broker accounts ---------------------------------
class SignatureError(CryptoError):
    """A signed document does not verify: missing, malformed, forged, or made with another key."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"signature check failed: {reason}")


class CommandNotFoundError(StorageError, NotFoundError):
    def __init__(self, device_id: str, command_id: str) -> None:
        self.device_id = device_id
        self.command_id = command_id
        super().__init__(f"command {command_id!r} of device {device_id!r} does not exist")


class BrokerAdminError(BrokerError):
    """The broker refused an account change (a Mosquitto dynamic-security command failed)."""

    def __init__(self, command: str, reason: str) -> None:
        self.command = command
        self.reason = reason
        super().__init__(f"the MQTT broker refused {command}: {reason}")


class CommandError(IotVaultError):
    """A command to a device cannot be made or sent."""


class CommandRejectedError(CommandError):
    """A device refuses a command; ``reason`` is the short word it reports in its ``cmdack``.

    Raised by the device SDK's checks (``unsigned``, ``bad_signature``, ``expired``,
    ``replayed``, …) and by a device's own handler to refuse a command it understood.
    """

    def __init__(self, reason: str, command_id: str | None = None, detail: str = "") -> None:
        self.reason = reason
        self.command_id = command_id
        self.detail = detail
        super().__init__(f"command refused: {reason}" + (f" ({detail})" if detail else ""))
