from feast import Entity, ValueType

user_entity = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A Pinner who is shown promoted Pins.",
)

pin_entity = Entity(
    name="pin",
    join_keys=["pin_id"],
    value_type=ValueType.INT64,
    description="A promoted Pin (ad).",
)
