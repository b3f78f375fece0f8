# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""The default concept vocabulary: common object, animal, scene and clothing names for the concept bank.

Source: the 80 COCO object categories (Lin et al., 2014; names as in the COCO 2017 annotations), followed by common
category names from the Open Images V7 boxable classes and the LVIS "frequent" categories (clothing, food, animals,
household objects, vehicles, scenes), lower-cased, de-duplicated and with synonyms folded. Users with a specific domain
should mine their own vocabulary from their captions (`trainers.models.mine_concepts`, or `nlip-train --concept_vocabulary mined`).
"""

COCO_CONCEPTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

COMMON_CONCEPTS = (
    # people
    "man", "woman", "child", "boy", "girl", "baby", "crowd", "player", "chef", "soldier",
    # clothing and accessories
    "shirt", "t-shirt", "dress", "coat", "jacket", "sweater", "pullover", "trousers", "jeans", "shorts",
    "skirt", "suit", "hat", "cap", "helmet", "scarf", "glove", "sock", "shoe", "boot",
    "sandal", "sneaker", "high heels", "bag", "wallet", "belt", "glasses", "sunglasses", "watch", "necklace",
    "earring", "ring", "bracelet", "uniform", "swimsuit",
    # animals
    "animal", "puppy", "kitten", "bird", "duck", "goose", "chicken", "owl", "eagle", "parrot",
    "penguin", "swan", "pigeon", "fish", "shark", "whale", "dolphin", "turtle", "frog", "snake",
    "lizard", "crocodile", "lion", "tiger", "leopard", "cheetah", "monkey", "gorilla", "fox", "wolf",
    "deer", "rabbit", "squirrel", "mouse", "rat", "pig", "goat", "camel", "kangaroo", "panda",
    "butterfly", "bee", "spider", "insect", "crab",
    # food and drink
    "food", "bread", "cheese", "egg", "meat", "steak", "sausage", "salad", "soup", "rice",
    "pasta", "noodles", "burger", "fries", "cookie", "pie", "muffin", "pancake", "ice cream", "chocolate",
    "candy", "fruit", "vegetable", "strawberry", "grape", "lemon", "pear", "peach", "pineapple", "watermelon",
    "tomato", "potato", "onion", "mushroom", "corn", "pepper", "cucumber", "lettuce", "coffee", "tea",
    "juice", "milk", "beer", "wine", "water",
    # household objects
    "table", "desk", "shelf", "cabinet", "drawer", "lamp", "candle", "mirror", "window", "door",
    "curtain", "pillow", "blanket", "rug", "carpet", "sofa", "stool", "fireplace", "bathtub", "shower",
    "towel", "plate", "glass", "mug", "jar", "pot", "pan", "kettle", "teapot", "basket",
    "box", "bucket", "trash can", "fan", "television", "computer", "monitor", "phone", "camera", "headphones",
    "speaker", "guitar", "piano", "violin", "drum", "toy", "doll", "balloon", "flag", "sign",
    "poster", "painting", "picture frame", "flower", "rose", "sunflower", "plant", "tree", "leaf", "grass",
    "pen", "pencil", "paper", "notebook", "newspaper", "letter", "map", "key", "lock", "tool",
    "hammer", "screwdriver", "ladder", "rope", "wheel", "tire", "bicycle helmet", "ball", "football", "basketball",
    "tennis ball", "golf club", "bat",
    # vehicles
    "vehicle", "van", "taxi", "ambulance", "fire truck", "tractor", "motorbike", "scooter", "tram", "subway",
    "helicopter", "rocket", "ship", "sailboat", "canoe", "kayak", "yacht", "cart", "wagon", "carriage",
    # places and scenes
    "street", "road", "sidewalk", "bridge", "building", "house", "skyscraper", "tower", "church", "castle",
    "temple", "shop", "restaurant", "kitchen", "bedroom", "bathroom", "living room", "office", "classroom", "library",
    "park", "garden", "playground", "stadium", "airport", "station", "beach", "sea", "ocean", "lake",
    "river", "waterfall", "mountain", "hill", "forest", "desert", "field", "farm", "snow", "sky",
    "cloud", "sun", "moon", "star", "city", "village", "fence", "wall", "roof", "stairs",
)


def _deduplicate(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """Concatenate groups, keeping the first occurrence of each name."""
    return tuple(dict.fromkeys(name for group in groups for name in group))


DEFAULT_CONCEPT_VOCABULARY: tuple[str, ...] = _deduplicate(COCO_CONCEPTS, COMMON_CONCEPTS)

__all__ = ["DEFAULT_CONCEPT_VOCABULARY"]
