"""The MQTT broker side of iotvault.

``iotvault.broker.embedded`` runs an MQTT 3.1.1 broker inside the iotvault process (setting
``IOTVAULT_BROKER_URL=embedded``), with hooks that let iotvault store a device's event before
the device is acknowledged, and decide who may connect, publish and subscribe.

Nothing is imported here on purpose: the embedded broker pulls in amqtt, which a deployment
that uses an external broker (Mosquitto) never needs.
"""
