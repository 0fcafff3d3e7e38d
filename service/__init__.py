"""lineinspect.service"""
