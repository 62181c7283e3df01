#!/usr/bin/env python3
"""MediaPipe's own hand landmarks (the `mediapipe` wheel's Python Hands, static image mode,
model complexity 0: palm_detection_lite and hand_landmark_lite, the default model set's
hand pair).

usage: hands.py IMAGE MAX_HANDS
Prints JSON: a list of hands, each a list of 21 [x, y] points in the image's pixels
(MediaPipe's normalised coordinates times the image's width and height).
"""
import json
import sys

import cv2
import mediapipe as mp


def main():
    path, max_hands = sys.argv[1], int(sys.argv[2])
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        sys.exit("cannot read " + path)
    h, w = image.shape[:2]
    with mp.solutions.hands.Hands(
        static_image_mode=True, max_num_hands=max_hands, model_complexity=0
    ) as hands:
        found = hands.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    out = [
        [[p.x * w, p.y * h] for p in hand.landmark]
        for hand in (found.multi_hand_landmarks or [])
    ]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
