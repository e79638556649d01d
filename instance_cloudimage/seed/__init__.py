"""What the guest agent is told and how it gets there: content, network, user-data, keys, delivery, re-seeding."""
