"""The MQTT broker side of iotvault.

- :mod:`.embedded` runs an MQTT 3.1.1 broker inside the iotvault process (setting
  ``IOTVAULT_BROKER_URL=embedded``), with hooks that let iotvault store a device's event before
  the device is acknowledged, and decide who may connect, publish and subscribe;
- :mod:`.acl` says which topics a device (and iotvault's own account) may use, and
  :mod:`.authority` applies it with the registry's credentials on the embedded broker;
  :mod:`.throttle` slows password guessing; :mod:`.security_log` writes refusals as security
  events;
- :mod:`.dynsec` keeps Mosquitto 2's dynamic-security plugin in step with the registry;
- :mod:`.publisher` is iotvault's own MQTT connection for sending commands; :mod:`.tls` makes
  the TLS contexts. What a node starts of all this is composed above the package, in
  :mod:`iotvault.wiring`, beside :mod:`iotvault.node`.

Nothing is imported here on purpose: the embedded broker pulls in amqtt, which a deployment
that uses an external broker (Mosquitto) never needs.
"""
